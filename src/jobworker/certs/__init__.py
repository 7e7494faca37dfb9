"""The CA, the server's certificate and client certificates, made with `cryptography`.

`build` makes certificates, `files` writes them, `read` loads and checks them, `revocation`
keeps the CRL, and `pki` is what `jobworker certs` does with them."""

from jobworker.certs.build import (
    CA_COMMON_NAME,
    CA_DAYS,
    LEAF_DAYS,
    SERVER_COMMON_NAME,
    new_ca,
    server_hosts,
    sign_certificate,
)
from jobworker.certs.errors import CaMissing, CertsError, CertsExist, InvalidCertName
from jobworker.certs.files import write_pair
from jobworker.certs.paths import ADMIN_NAME, CA_DIR, PkiPaths
from jobworker.certs.pki import init_pki, issue_client, issue_server, validate_client_name
from jobworker.certs.read import (
    CertInfo,
    check_key_mode,
    common_name,
    describe,
    list_certificates,
    load_ca,
    read_pair,
)
from jobworker.certs.revocation import CRL_DAYS, Revoked, revoke, write_crl

__all__ = [
    "ADMIN_NAME",
    "CA_COMMON_NAME",
    "CA_DAYS",
    "CA_DIR",
    "CRL_DAYS",
    "LEAF_DAYS",
    "SERVER_COMMON_NAME",
    "CaMissing",
    "CertInfo",
    "CertsError",
    "CertsExist",
    "InvalidCertName",
    "PkiPaths",
    "Revoked",
    "check_key_mode",
    "common_name",
    "describe",
    "init_pki",
    "issue_client",
    "issue_server",
    "list_certificates",
    "load_ca",
    "new_ca",
    "read_pair",
    "revoke",
    "server_hosts",
    "sign_certificate",
    "validate_client_name",
    "write_crl",
    "write_pair",
]
