"""The CA, the server's certificate and client certificates, made with `cryptography`."""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import re
import secrets
import socket
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from jobworker.errors import JobWorkerError
from jobworker.fsutil import fsync_dir

CA_DAYS = 3650
LEAF_DAYS = 825  # the longest validity browsers and most TLS stacks still accept
CA_COMMON_NAME = "jobworker CA"
SERVER_COMMON_NAME = "jobworker server"
ADMIN_NAME = "admin"

# Backdating absorbs clock skew between the host that issues and the hosts that verify.
_BACKDATE = dt.timedelta(minutes=5)
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
# These would collide with the CA's or the server's files.
_RESERVED_NAMES = frozenset({"ca", "ca-key", "server", "server-key", "crl"})
CA_DIR = "ca"  # the CA's key and its record of issued certificates: never the server's to read
CRL_DAYS = 3650  # the server does not expire the CRL it is given; other readers might


class CertsError(JobWorkerError):
    """A certificate operation cannot be done; the message says why and names the file."""


class CertsExist(CertsError):
    """The files to be written exist already and are never overwritten."""


class CaMissing(CertsError):
    """The CA's certificate or key is not in the directory."""


class InvalidCertName(CertsError):
    """A client name or a host name cannot go into a certificate."""


@dataclass(frozen=True, slots=True)
class PkiPaths:
    """The files written by `init_pki`."""

    directory: Path
    ca_cert: Path
    ca_key: Path  # in ca/, apart from what the server reads
    server_cert: Path
    server_key: Path
    admin_cert: Path
    admin_key: Path

    @classmethod
    def in_dir(cls, directory: Path) -> PkiPaths:
        """The standard file names inside `directory`."""
        return cls(
            directory=directory,
            ca_cert=directory / "ca.pem",
            ca_key=directory / CA_DIR / "ca-key.pem",
            server_cert=directory / "server.pem",
            server_key=directory / "server-key.pem",
            admin_cert=directory / f"{ADMIN_NAME}.pem",
            admin_key=directory / f"{ADMIN_NAME}-key.pem",
        )

    @property
    def crl(self) -> Path:
        """The revocation list `certs revoke` writes (point tls.crl at it)."""
        return self.directory / "crl.pem"

    @property
    def issued(self) -> Path:
        """A copy of every certificate the CA issued, by serial: what `revoke NAME` finds."""
        return self.directory / CA_DIR / "issued"

    @property
    def legacy_ca_key(self) -> Path:
        """Where releases before 0.3 kept the CA key: beside the server's files."""
        return self.directory / "ca-key.pem"

    def files(self) -> tuple[Path, ...]:
        """Every file, CA first."""
        return (
            self.ca_cert,
            self.ca_key,
            self.server_cert,
            self.server_key,
            self.admin_cert,
            self.admin_key,
        )


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


# --- building certificates --------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cn_name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def new_ca(
    common_name: str = CA_COMMON_NAME, *, days: int = CA_DAYS
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Make a self-signed P-256 CA that may sign leaf certificates only."""
    key = _new_key()
    now = _now()
    name = _cn_name(common_name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        # path_length=0: this CA signs servers and clients, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _san(host: str) -> x509.GeneralName:
    host = host.strip()
    if not host:
        raise InvalidCertName("a host name is empty")
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        # DNSName must be ASCII (IDNA A-labels); encoding checks it here with a clear message.
        host.encode("ascii")
    except UnicodeEncodeError:
        raise InvalidCertName(f"host {host!r} is not ASCII; give its IDNA form (xn--...)") from None
    return x509.DNSName(host)


def server_hosts(extra: Iterable[str] = ()) -> list[str]:
    """The server's default names (localhost, loopback IPs, this host's names) plus `extra`."""
    hosts = ["localhost", "127.0.0.1", "::1", socket.gethostname()]
    fqdn = socket.getfqdn()
    if fqdn != "localhost":
        hosts.append(fqdn)
    hosts.extend(extra)
    # Keep the order, drop repeats: a certificate with duplicate SANs looks like a mistake.
    seen: set[str] = set()
    unique = []
    for host in (h.strip() for h in hosts):
        if host and host not in seen:
            seen.add(host)
            unique.append(host)
    return unique


def sign_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    *,
    server: bool,
    hosts: Sequence[str] = (),
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    days: int = LEAF_DAYS,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Sign a new P-256 leaf (serverAuth or clientAuth) whose SANs are exactly `hosts`."""
    key = _new_key()
    now = _now()
    start = not_before if not_before is not None else now - _BACKDATE
    end = not_after if not_after is not None else now + dt.timedelta(days=days)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_cn_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if hosts:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False
        )
    return builder.sign(ca_key, hashes.SHA256()), key


# --- files ------------------------------------------------------------------------------


def _cert_bytes(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_temp(final: Path, data: bytes, mode: int) -> Path:
    """Write `data` to a fresh hidden file next to `final`, created with `mode` from the start."""
    tmp = final.with_name(f".{final.name}.tmp-{secrets.token_hex(4)}")
    # O_EXCL with the mode given at creation: a key is never readable by others, not even
    # for the moment between create and chmod.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have removed bits a certificate should have
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return tmp


def _stage(items: Sequence[tuple[Path, bytes, int]]) -> list[tuple[Path, Path]]:
    """Write every item to a temp file; on failure remove them all."""
    staged: list[tuple[Path, Path]] = []
    try:
        for final, data, mode in items:
            staged.append((_write_temp(final, data, mode), final))
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    return staged


def _fsync_parents(staged: Sequence[tuple[Path, Path]]) -> None:
    for directory in dict.fromkeys(final.parent for _, final in staged):
        fsync_dir(directory)


def _install_new(staged: Sequence[tuple[Path, Path]]) -> None:
    """Move staged files into place, none overwriting an existing file, all or nothing."""
    linked: list[Path] = []
    try:
        for tmp, final in staged:
            # link() fails if the name exists, so a file created meanwhile is never clobbered.
            try:
                os.link(tmp, final)
            except FileExistsError:
                raise CertsExist(f"{final} exists already; refusing to overwrite it") from None
            linked.append(final)
    except BaseException:
        for final in linked:
            final.unlink(missing_ok=True)
        raise
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    _fsync_parents(staged)


def _install_replace(staged: Sequence[tuple[Path, Path]]) -> None:
    """Move staged files into place by rename, replacing what is there."""
    try:
        for tmp, final in staged:
            os.replace(tmp, final)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    _fsync_parents(staged)


def _pair_items(
    cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, cert_path: Path, key_path: Path
) -> list[tuple[Path, bytes, int]]:
    # Key first: whoever sees the new certificate must already find its key.
    return [(key_path, _key_bytes(key), 0o600), (cert_path, _cert_bytes(cert), 0o644)]


def write_pair(
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    cert_path: Path,
    key_path: Path,
    *,
    overwrite: bool = False,
) -> None:
    """Write a certificate (0644) and its key (0600); refuse existing files unless `overwrite`."""
    staged = _stage(_pair_items(cert, key, cert_path, key_path))
    if overwrite:
        _install_replace(staged)
    else:
        _install_new(staged)


def _ensure_dir(directory: Path) -> None:
    # 0700: the directory holds private keys; an existing directory is left as the owner set it.
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)


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


# --- operations -------------------------------------------------------------------------


def init_pki(directory: Path, hosts: Sequence[str] = (), days: int = LEAF_DAYS) -> PkiPaths:
    """Create the CA, the server's certificate and the admin's client certificate in `directory`."""
    paths = PkiPaths.in_dir(directory)
    for existing in (paths.ca_cert, paths.ca_key, paths.legacy_ca_key):
        if existing.exists():
            raise CertsExist(
                f"a CA already exists in {directory} ({existing.name}); refusing to overwrite it"
            )
    server_names = server_hosts(hosts)
    for host in server_names:
        _san(host)  # reject a bad host before anything is written
    ca_cert, ca_key = new_ca()
    server_cert, server_key = sign_certificate(
        ca_cert, ca_key, SERVER_COMMON_NAME, server=True, hosts=server_names, days=days
    )
    admin_cert, admin_key = sign_certificate(ca_cert, ca_key, ADMIN_NAME, server=False, days=days)
    _ensure_dir(directory)
    _ensure_dir(paths.ca_key.parent)  # ca/, 0700: mkdir's parents would get the umask's mode
    _ensure_dir(paths.issued)
    ca_staged = _stage(
        [(paths.ca_key, _key_bytes(ca_key), 0o600), (paths.ca_cert, _cert_bytes(ca_cert), 0o644)]
    )
    try:
        leaf_staged = _stage(
            _pair_items(server_cert, server_key, paths.server_cert, paths.server_key)
            + _pair_items(admin_cert, admin_key, paths.admin_cert, paths.admin_key)
        )
    except BaseException:
        for tmp, _ in ca_staged:
            tmp.unlink(missing_ok=True)
        raise
    try:
        # The CA goes in first and without overwriting: it is the claim on the directory.
        _install_new(ca_staged)
    except BaseException:
        for tmp, _ in leaf_staged:
            tmp.unlink(missing_ok=True)
        raise
    try:
        # Leaves left over from an earlier, deleted CA are useless; replace them.
        _install_replace(leaf_staged)
    except BaseException:
        # Without its server certificate the new CA is half made; take it out again.
        paths.ca_cert.unlink(missing_ok=True)
        paths.ca_key.unlink(missing_ok=True)
        raise
    for cert in (server_cert, admin_cert):
        _record(paths, cert)
    write_crl(paths, ca_cert, ca_key, [])  # empty: tls.crl can name it from the start
    return paths


def issue_server(
    directory: Path, hosts: Sequence[str] = (), days: int = LEAF_DAYS
) -> tuple[Path, Path]:
    """(Re)issue server.pem and server-key.pem from the CA in `directory`, replacing them."""
    paths = PkiPaths.in_dir(directory)
    ca_cert, ca_key = load_ca(directory)
    cert, key = sign_certificate(
        ca_cert, ca_key, SERVER_COMMON_NAME, server=True, hosts=server_hosts(hosts), days=days
    )
    # Each file is replaced by rename, so a reader sees an old or a new file, never a torn one.
    write_pair(cert, key, paths.server_cert, paths.server_key, overwrite=True)
    _record(paths, cert)
    return paths.server_cert, paths.server_key


def validate_client_name(name: str) -> None:
    """Raise InvalidCertName unless `name` is usable as an identity and as a file name."""
    if not _NAME_RE.fullmatch(name):
        raise InvalidCertName(
            f"invalid client name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ @ -, "
            "starting with a letter or digit"
        )
    if name.lower() in _RESERVED_NAMES or name.endswith("-key"):
        raise InvalidCertName(f"client name {name!r} is reserved")


def issue_client(directory: Path, name: str, days: int = LEAF_DAYS) -> tuple[Path, Path]:
    """Issue NAME.pem and NAME-key.pem (CN=NAME, clientAuth) from the CA in `directory`."""
    validate_client_name(name)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    for existing in (cert_path, key_path):
        if existing.exists():
            raise CertsExist(
                f"a certificate for {name!r} already exists ({existing}); refusing to overwrite it"
            )
    ca_cert, ca_key = load_ca(directory)
    cert, key = sign_certificate(ca_cert, ca_key, name, server=False, days=days)
    write_pair(cert, key, cert_path, key_path)
    _record(PkiPaths.in_dir(directory), cert)
    return cert_path, key_path


# --- reading ----------------------------------------------------------------------------


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
        expired=not_after <= _now(),
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


# --- revocation -------------------------------------------------------------------------


def _record(paths: PkiPaths, cert: x509.Certificate) -> None:
    """Keep a copy of an issued certificate in ca/issued/, named by its serial."""
    paths.issued.mkdir(mode=0o700, parents=True, exist_ok=True)
    _install_replace(
        _stage([(paths.issued / f"{cert.serial_number:x}.pem", _cert_bytes(cert), 0o644)])
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
    now = _now()
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
        builder.last_update(now - _BACKDATE)
        .next_update(now + dt.timedelta(days=CRL_DAYS))
        .add_extension(x509.CRLNumber(number), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _install_replace(_stage([(paths.crl, crl.public_bytes(serialization.Encoding.PEM), 0o644)]))
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
