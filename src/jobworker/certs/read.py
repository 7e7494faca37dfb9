"""Reading certificates: the CA, a certificate with its key, and what a certificate says."""

from __future__ import annotations

import contextlib
import stat
from pathlib import Path
from typing import TypedDict

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from jobworker.certs.build import utc_now
from jobworker.certs.errors import CaMissing, CertsError
from jobworker.certs.paths import PkiPaths


class CertInfo(TypedDict):
    """What `describe` reports about one certificate."""

    path: str
    common_name: str
    subject: str
    issuer: str
    serial: str
    not_before: str
    not_after: str
    expired: bool
    is_ca: bool
    usages: list[str]
    sans: list[str]


def load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Load ca.pem and ca/ca-key.pem (or, made by an older release, ca-key.pem) from `directory`."""
    paths = PkiPaths.in_dir(directory)
    key_path = paths.ca_key
    if not key_path.exists() and paths.legacy_ca_key.exists():
        key_path = paths.legacy_ca_key
    try:
        cert_pem = paths.ca_cert.read_bytes()
        key_pem = key_path.read_bytes()
    except FileNotFoundError as e:
        raise CaMissing(
            f"no CA in {directory} ({Path(str(e.filename)).name} is missing); "
            "create one with `jobworker certs init`"
        ) from None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise CertsError(f"cannot read the CA in {directory}: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertsError(f"{key_path} is not an EC private key")
    if key.public_key() != cert.public_key():
        raise CertsError(f"{key_path} does not match {paths.ca_cert}")
    return cert, key


def common_name(cert_pem: bytes) -> str:
    """The subject common name of a PEM certificate."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    values = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not values:
        raise CertsError("the certificate has no common name")
    value = values[0].value
    return value if isinstance(value, str) else value.decode()


def check_key_mode(key_path: Path) -> None:
    """CertsError when a private key file grants group or others any access."""
    mode = stat.S_IMODE(key_path.stat().st_mode)
    if mode & 0o077:
        raise CertsError(
            f"{key_path} is open to group or others (mode {mode:04o}); a private key must "
            f"be readable by its owner only: chmod 600 {key_path}"
        )


def read_pair(cert_path: Path, key_path: Path) -> tuple[bytes, bytes]:
    """Read a certificate and its key as PEM, checking that they belong together and that
    the key is its owner's only."""
    check_key_mode(key_path)
    cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise CertsError(f"cannot read {cert_path} and {key_path}: {e}") from None
    # During a rotation one file may be new and the other old; a reloader must not use that.
    if key.public_key() != cert.public_key():
        raise CertsError(f"{key_path} does not match {cert_path}")
    return cert_pem, key_pem


def _sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    out: list[str] = []
    for general in ext.value:
        if isinstance(general, x509.DNSName):
            out.append(f"DNS:{general.value}")
        elif isinstance(general, x509.IPAddress):
            out.append(f"IP:{general.value}")
        else:
            out.append(str(general.value))
    return out


def _usages(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    except x509.ExtensionNotFound:
        return []
    names = {
        ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
        ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    }
    return [names.get(oid, oid.dotted_string) for oid in ext.value]


def _is_ca(cert: x509.Certificate) -> bool:
    with contextlib.suppress(x509.ExtensionNotFound):
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    return False


def describe(path: Path) -> CertInfo:
    """Subject, issuer, validity, usages and SANs of the PEM certificate at `path`."""
    cert_pem = path.read_bytes()
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as e:
        raise CertsError(f"{path} is not a PEM certificate: {e}") from None
    try:
        cn = common_name(cert_pem)
    except CertsError:
        cn = ""
    not_after = cert.not_valid_after_utc
    return CertInfo(
        path=str(path),
        common_name=cn,
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        serial=f"{cert.serial_number:x}",
        not_before=cert.not_valid_before_utc.isoformat(),
        not_after=not_after.isoformat(),
        expired=not_after <= utc_now(),
        is_ca=_is_ca(cert),
        usages=(["CA"] if _is_ca(cert) else []) + _usages(cert),
        sans=_sans(cert),
    )


def list_certificates(directory: Path) -> list[Path]:
    """The certificate files in `directory` (every *.pem but keys), CA and server first."""
    if not directory.is_dir():
        raise CaMissing(f"{directory} is not a directory; create it with `jobworker certs init`")
    found = [
        p
        for p in directory.glob("*.pem")
        if not p.name.endswith("-key.pem") and p.name != "crl.pem"
    ]
    order = {"ca.pem": 0, "server.pem": 1}
    return sorted(found, key=lambda p: (order.get(p.name, 2), p.name))
