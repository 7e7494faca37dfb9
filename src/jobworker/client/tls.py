"""Checks of the client's certificate files, and why a TLS handshake failed, in plain words."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization


def check_credentials(
    ca_pem: bytes, cert_pem: bytes, key_pem: bytes, names: tuple[str, str, str], now: dt.datetime
) -> list[str]:
    """Every problem with the three PEMs: unparsable, key not matching the certificate,
    certificate not signed by the CA, dates out of range. Empty when they are fine."""
    ca_name, cert_name, key_name = names
    problems: list[str] = []
    ca = _certificate(ca_pem, f"CA certificate {ca_name}", problems)
    cert = _certificate(cert_pem, f"client certificate {cert_name}", problems)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as err:
        problems.append(f"client key {key_name} is not an unencrypted PEM private key ({err})")
        key = None
    for what, certificate in ((f"CA certificate {ca_name}", ca), (cert_name, cert)):
        if certificate is not None:
            problems.extend(_dates(what, certificate, now))
    if cert is not None and key is not None and key.public_key() != cert.public_key():
        problems.append(
            f"client key {key_name} does not belong to the certificate {cert_name} "
            "(they were issued as a pair: use the -key.pem issued with it)"
        )
    if ca is not None and cert is not None:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            problems.append(
                f"client certificate {cert_name} (issued by "
                f"{cert.issuer.rfc4514_string()!r}) is not signed by the CA {ca_name} "
                f"({ca.subject.rfc4514_string()!r}): the server would refuse it"
            )
    return problems


def _certificate(pem: bytes, what: str, problems: list[str]) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        problems.append(f"{what} is not a PEM certificate")
        return None


def _dates(what: str, cert: x509.Certificate, now: dt.datetime) -> list[str]:
    if now < cert.not_valid_before_utc:
        return [f"{what} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"]
    if now > cert.not_valid_after_utc:
        return [
            f"{what} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC "
            "(issue a new one: jobworker certs issue NAME)"
        ]
    return []


def explain_unreachable(
    server: str,
    ca_pem: bytes,
    cert_pem: bytes,
    key_pem: bytes,
    server_name: str | None = None,
    timeout: float = 5.0,
) -> str | None:
    """Why the server at `server` could not be reached, found by connecting again with
    Python's own TLS: nothing listening, not TLS, wrong CA, certificate refused.
    None when the handshake works (the cause lies elsewhere)."""
    host, _, port_text = server.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        return f"{server!r} is not HOST:PORT"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as err:
        return f"nothing is listening at {server} ({err.strerror or err})"
    with sock:
        return _handshake(sock, server, host, ca_pem, cert_pem, key_pem, server_name)


def _handshake(
    sock: socket.socket,
    server: str,
    host: str,
    ca_pem: bytes,
    cert_pem: bytes,
    key_pem: bytes,
    server_name: str | None,
) -> str | None:
    context = ssl.create_default_context(cadata=ca_pem.decode("ascii", "replace"))
    context.set_alpn_protocols(["h2"])
    _load_pair(context, cert_pem, key_pem)
    try:
        with context.wrap_socket(sock, server_hostname=server_name or host) as tls:
            return _verdict(tls, server)
    except ssl.SSLCertVerificationError as err:
        return (
            f"the server at {server} has a certificate your CA does not vouch for "
            f"({err.verify_message}): is the CA file the one of this server?"
        )
    except ssl.SSLError as err:
        if "WRONG_VERSION_NUMBER" in str(err) or "record layer failure" in str(err):
            return (
                f"{server} does not speak TLS: not a jobworker server's port "
                "(the metrics port, perhaps?)"
            )
        return _refused(server, err)
    except OSError as err:
        return f"the connection to {server} broke during the TLS handshake ({err})"


def _verdict(tls: ssl.SSLSocket, server: str) -> str | None:
    # TLS 1.3 servers send their verdict on our certificate after the handshake.
    tls.settimeout(1.0)
    try:
        tls.recv(1)
    except TimeoutError:
        return None
    except ssl.SSLError as err:
        return _refused(server, err)
    return None


def _refused(server: str, err: ssl.SSLError) -> str:
    text = str(err).lower()
    for words, why in (
        ("unknown ca", "it was not signed by the server's CA"),
        ("revoked", "it has been revoked"),
        ("expired", "it has expired"),
        ("certificate required", "none was sent"),
        ("bad certificate", "the server does not accept it"),
    ):
        if words in text:
            return f"the server at {server} refused your client certificate: {why}"
    return f"the TLS handshake with {server} failed: {err.reason or err}"


def _load_pair(context: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    import tempfile

    # ssl loads a certificate chain from files only.
    with tempfile.TemporaryDirectory(prefix="jobworker-") as tmp:
        cert_file, key_file = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert_file.write_bytes(cert_pem)
        key_file.touch(mode=0o600)
        key_file.write_bytes(key_pem)
        context.load_cert_chain(cert_file, key_file)
