"""Where a certificate directory keeps each file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ADMIN_NAME = "admin"
CA_DIR = "ca"  # the CA's key and its record of issued certificates: never the server's to read


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
