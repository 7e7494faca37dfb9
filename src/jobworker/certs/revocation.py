"""Revocation: the CA's record of what it issued, and the CRL that `certs revoke` writes."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from jobworker.certs.build import BACKDATE, utc_now
from jobworker.certs.errors import CertsError
from jobworker.certs.files import cert_bytes, install_replace, stage
from jobworker.certs.paths import PkiPaths
from jobworker.certs.read import list_certificates, load_ca

CRL_DAYS = 3650  # the server does not expire the CRL it is given; other readers might


def record_issued(paths: PkiPaths, cert: x509.Certificate) -> None:
    """Keep a copy of an issued certificate in ca/issued/, named by its serial."""
    paths.issued.mkdir(mode=0o700, parents=True, exist_ok=True)
    install_replace(
        stage([(paths.issued / f"{cert.serial_number:x}.pem", cert_bytes(cert), 0o644)])
    )


def _issued(paths: PkiPaths) -> dict[int, tuple[str, Path]]:
    """Every certificate to be found in the folder and in ca/issued: serial -> (CN, file)."""
    found: dict[int, tuple[str, Path]] = {}
    files = sorted(paths.issued.glob("*.pem")) if paths.issued.is_dir() else []
    files += [p for p in list_certificates(paths.directory) if p != paths.ca_cert]
    for path in files:
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError):
            continue  # not a certificate: nothing of it to revoke
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        value = names[0].value if len(names) == 1 else ""
        found.setdefault(cert.serial_number, (str(value), path))
    return found


def _read_crl(paths: PkiPaths, ca_cert: x509.Certificate) -> x509.CertificateRevocationList | None:
    try:
        crl = x509.load_pem_x509_crl(paths.crl.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise CertsError(
            f"{paths.crl} is not a PEM CRL ({e}); move it away to start anew"
        ) from None
    if crl.issuer != ca_cert.subject or not crl.is_signature_valid(ca_cert.public_key()):  # type: ignore[arg-type]
        raise CertsError(f"{paths.crl} is not signed by the CA in {paths.ca_cert}")
    return crl


def write_crl(
    paths: PkiPaths,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    serials: Iterable[int],
) -> Path:
    """Write crl.pem (atomically, by rename): what it revoked already plus `serials`."""
    old = _read_crl(paths, ca_cert)
    now = utc_now()
    number = 1
    builder = x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
    revoked: set[int] = set()
    if old is not None:
        with contextlib.suppress(x509.ExtensionNotFound):
            number = old.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
        for entry in old:
            revoked.add(entry.serial_number)
            builder = builder.add_revoked_certificate(entry)
    for serial in serials:
        if serial not in revoked:
            revoked.add(serial)
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
            )
    crl = (
        builder.last_update(now - BACKDATE)
        .next_update(now + dt.timedelta(days=CRL_DAYS))
        .add_extension(x509.CRLNumber(number), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    install_replace(stage([(paths.crl, crl.public_bytes(serialization.Encoding.PEM), 0o644)]))
    return paths.crl


@dataclass(frozen=True, slots=True)
class Revoked:
    """One certificate `revoke` put on the CRL: its serial, CN and file, where known."""

    serial: int
    common_name: str
    path: Path | None


def revoke(directory: Path, target: str) -> tuple[list[Revoked], Path]:
    """Revoke every certificate found whose common name is `target`, else the one whose
    serial (hex, as `certs show` prints it) it is; what was revoked, and the CRL written."""
    paths = PkiPaths.in_dir(directory)
    ca_cert, ca_key = load_ca(directory)
    found = _issued(paths)
    chosen = [Revoked(s, cn, p) for s, (cn, p) in found.items() if cn == target]
    if not chosen:
        digits = target.lower().removeprefix("0x").replace(":", "")
        if not digits or any(c not in "0123456789abcdef" for c in digits):
            raise CertsError(
                f"no certificate of {target!r} in {directory} or {paths.issued}, and it is not "
                "a serial number (hex, as `jobworker certs show` prints it)"
            )
        serial = int(digits, 16)
        cn, path = found.get(serial, ("", None))
        chosen = [Revoked(serial, cn, path)]
    if any(r.serial == ca_cert.serial_number for r in chosen):
        raise CertsError("the CA cannot revoke itself; make a new CA instead")
    return chosen, write_crl(paths, ca_cert, ca_key, [r.serial for r in chosen])
