"""What `jobworker certs` does: set up a directory, issue server and client certificates."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from jobworker.certs.build import (
    LEAF_DAYS,
    SERVER_COMMON_NAME,
    host_san,
    new_ca,
    server_hosts,
    sign_certificate,
)
from jobworker.certs.errors import CertsExist, InvalidCertName
from jobworker.certs.files import (
    cert_bytes,
    ensure_dir,
    install_new,
    install_replace,
    key_bytes,
    pair_items,
    stage,
    write_pair,
)
from jobworker.certs.paths import ADMIN_NAME, PkiPaths
from jobworker.certs.read import load_ca
from jobworker.certs.revocation import record_issued, write_crl

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
# These would collide with the CA's or the server's files.
_RESERVED_NAMES = frozenset({"ca", "ca-key", "server", "server-key", "crl"})


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
        host_san(host)  # reject a bad host before anything is written
    ca_cert, ca_key = new_ca()
    server_cert, server_key = sign_certificate(
        ca_cert, ca_key, SERVER_COMMON_NAME, server=True, hosts=server_names, days=days
    )
    admin_cert, admin_key = sign_certificate(ca_cert, ca_key, ADMIN_NAME, server=False, days=days)
    ensure_dir(directory)
    ensure_dir(paths.ca_key.parent)  # ca/, 0700: mkdir's parents would get the umask's mode
    ensure_dir(paths.issued)
    ca_staged = stage(
        [(paths.ca_key, key_bytes(ca_key), 0o600), (paths.ca_cert, cert_bytes(ca_cert), 0o644)]
    )
    try:
        leaf_staged = stage(
            pair_items(server_cert, server_key, paths.server_cert, paths.server_key)
            + pair_items(admin_cert, admin_key, paths.admin_cert, paths.admin_key)
        )
    except BaseException:
        for tmp, _ in ca_staged:
            tmp.unlink(missing_ok=True)
        raise
    try:
        # The CA goes in first and without overwriting: it is the claim on the directory.
        install_new(ca_staged)
    except BaseException:
        for tmp, _ in leaf_staged:
            tmp.unlink(missing_ok=True)
        raise
    try:
        # Leaves left over from an earlier, deleted CA are useless; replace them.
        install_replace(leaf_staged)
    except BaseException:
        # Without its server certificate the new CA is half made; take it out again.
        paths.ca_cert.unlink(missing_ok=True)
        paths.ca_key.unlink(missing_ok=True)
        raise
    for cert in (server_cert, admin_cert):
        record_issued(paths, cert)
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
    record_issued(paths, cert)
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
    record_issued(PkiPaths.in_dir(directory), cert)
    return cert_path, key_path
