"""Making certificates: the CA and the leaves it signs (ECDSA P-256, SHA-256)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from jobworker.certs.errors import InvalidCertName

CA_DAYS = 3650
LEAF_DAYS = 825  # the longest validity browsers and most TLS stacks still accept
CA_COMMON_NAME = "jobworker CA"
SERVER_COMMON_NAME = "jobworker server"

# Backdating absorbs clock skew between the host that issues and the hosts that verify.
BACKDATE = dt.timedelta(minutes=5)


def utc_now() -> dt.datetime:
    """The current time, in UTC."""
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
    now = utc_now()
    name = _cn_name(common_name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
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


def host_san(host: str) -> x509.GeneralName:
    """`host` as a SAN: an IP address, else an ASCII DNS name; InvalidCertName if neither."""
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
    now = utc_now()
    start = not_before if not_before is not None else now - BACKDATE
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
            x509.SubjectAlternativeName([host_san(h) for h in hosts]), critical=False
        )
    return builder.sign(ca_key, hashes.SHA256()), key
