"""Identity from the certificate itself, revocation, bad bytes and echoed input (issue 11)."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from jobworker import certs
from jobworker.v1 import jobworker_pb2 as pb
from jobworker.v1 import jobworker_pb2_grpc as pb_grpc

from .conftest import PY, Server, job, rpc_error, schedule, serve_expecting_failure

SERVICE = "/jobworker.v1.JobWorkerService/"
LINE_LIMIT = 1024


def _client_cert(pki: Path, out: Path, name: str, subject: x509.Name) -> Path:
    """A clientAuth certificate with exactly `subject`, signed by the test CA, as name.pem."""
    ca_cert, ca_key = certs.load_ca(pki)
    key = ec.generate_private_key(ec.SECP256R1())
    now = ca_cert.not_valid_before_utc
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(ca_cert.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("client.example.com")]), critical=False
        )
    )
    cert = builder.sign(ca_key, hashes.SHA256())
    out.mkdir(parents=True, exist_ok=True)
    certs.write_pair(cert, key, out / f"{name}.pem", out / f"{name}-key.pem", overwrite=True)
    return out


def _cn(value: str) -> x509.NameAttribute[str]:
    # _validate=False: cryptography refuses an empty CN itself; other CAs have issued them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return x509.NameAttribute(NameOID.COMMON_NAME, value, _validate=False)


def _list(server: Server, identity: str, pki: Path) -> grpc.RpcError:
    channel = server.channel(identity, pki=pki)
    stub = pb_grpc.JobWorkerServiceStub(channel)
    try:
        return rpc_error(lambda: stub.ListBatches(pb.ListBatchesRequest(), timeout=10))
    finally:
        channel.close()


@pytest.mark.parametrize(
    ("label", "subject"),
    [
        ("nul", x509.Name([_cn("admin\x00x")])),
        ("control", x509.Name([_cn("admin\x1b[2J")])),
        ("no-cn", x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "acme")])),
        ("two-cn", x509.Name([_cn("alice"), _cn("admin")])),
        ("empty-cn", x509.Name([_cn("")])),
    ],
)
def test_a_certificate_without_exactly_one_clean_cn_is_unauthenticated(
    server: Server, tmp_path: Path, label: str, subject: x509.Name
) -> None:
    out = _client_cert(server.pki, tmp_path, label, subject)
    err = _list(server, label, out)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (err.code(), err.details())
    assert "common name" in (err.details() or "")
    # the audit line says who was refused, shortened and escaped
    line = server.wait_for_log("rpc", count=1)[-1]
    assert line["code"] == "UNAUTHENTICATED"


def test_undecodable_bytes_to_each_rpc_are_invalid_argument(server: Server) -> None:
    channel = server.channel("alice")
    garbage = b"\x0a\xff\xff\xff\xff\x0f"  # a length-delimited field far longer than the message
    try:
        for method in ("GetBatch", "CancelBatch", "ListBatches", "DeleteBatch"):
            call = channel.unary_unary(SERVICE + method)
            err = rpc_error(lambda call=call: call(garbage, timeout=10))  # type: ignore[misc]
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err.code())
        stream = channel.unary_stream(SERVICE + "StreamBatchLogs")
        err = rpc_error(lambda: list(stream(garbage, timeout=10)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        upload = channel.stream_unary(SERVICE + "ScheduleBatch")
        err = rpc_error(lambda: upload(iter([garbage]), timeout=10))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    finally:
        channel.close()
    time.sleep(0.5)
    assert not [r for r in server.raw if "Traceback" in r or "raised by servicer" in r]


def _audit_lines_of(server: Server, method: str) -> list[str]:
    return [r for r in list(server.raw) if f'"method": "{method}"' in r]


def test_a_huge_correlation_id_gives_short_messages_and_lines(server: Server) -> None:
    stub = server.stub("alice")
    cid = "c" * 100_000
    err = rpc_error(lambda: stub.GetBatch(pb.GetBatchRequest(correlation_id=cid), timeout=10))
    assert err.code() == grpc.StatusCode.NOT_FOUND, (err.code(), len(err.details() or ""))
    assert len((err.details() or "").encode()) <= LINE_LIMIT
    time.sleep(0.3)
    lines = _audit_lines_of(server, "GetBatch")
    assert lines and all(len(r.encode()) <= LINE_LIMIT for r in lines), max(map(len, lines))


def test_a_huge_job_name_gives_a_short_message(server: Server) -> None:
    stub = server.stub("alice")
    err = rpc_error(lambda: schedule(stub, job(PY, "-c", "pass", name="n" * 20_000)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), len(err.details() or ""))
    details = err.details() or ""
    assert len(details.encode()) <= LINE_LIMIT
    assert "name" in details
    time.sleep(0.3)
    assert all(len(r.encode()) <= LINE_LIMIT for r in _audit_lines_of(server, "ScheduleBatch"))


def test_server_key_readable_by_others_is_refused_at_start(pki: Path, tmp_path: Path) -> None:
    from .conftest import write_config

    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("server.pem", "server-key.pem"):
        (keys / name).write_bytes((pki / name).read_bytes())
    key = keys / "server-key.pem"
    os.chmod(key, 0o644)
    config = write_config(
        tmp_path / "c.toml",
        pki,
        tmp_path / "data",
        tls={"server_key": str(key), "server_cert": str(keys / "server.pem")},
    )
    serve_expecting_failure(config, str(key), "chmod 600")
