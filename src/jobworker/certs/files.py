"""Writing certificates and keys: all or nothing, keys 0600 from creation, never torn."""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from jobworker.certs.errors import CertsExist
from jobworker.fsutil import fsync_dir


def cert_bytes(cert: x509.Certificate) -> bytes:
    """The certificate as PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def key_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The key as unencrypted PKCS#8 PEM (its file's mode protects it)."""
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


def stage(items: Sequence[tuple[Path, bytes, int]]) -> list[tuple[Path, Path]]:
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


def install_new(staged: Sequence[tuple[Path, Path]]) -> None:
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


def install_replace(staged: Sequence[tuple[Path, Path]]) -> None:
    """Move staged files into place by rename, replacing what is there."""
    try:
        for tmp, final in staged:
            os.replace(tmp, final)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    _fsync_parents(staged)


def pair_items(
    cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, cert_path: Path, key_path: Path
) -> list[tuple[Path, bytes, int]]:
    """What `stage` takes to write a certificate and its key."""
    # Key first: whoever sees the new certificate must already find its key.
    return [(key_path, key_bytes(key), 0o600), (cert_path, cert_bytes(cert), 0o644)]


def write_pair(
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    cert_path: Path,
    key_path: Path,
    *,
    overwrite: bool = False,
) -> None:
    """Write a certificate (0644) and its key (0600); refuse existing files unless `overwrite`."""
    staged = stage(pair_items(cert, key, cert_path, key_path))
    if overwrite:
        install_replace(staged)
    else:
        install_new(staged)


def ensure_dir(directory: Path) -> None:
    """Create `directory` (and its parents) if missing."""
    # 0700: the directory holds private keys; an existing directory is left as the owner set it.
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
