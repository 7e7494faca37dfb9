"""Identity from the certificate itself, revocation, bad bytes and echoed input (issue 11)."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from jobworker import certs
from jobworker.cli import main
from jobworker.client.channel import CHANNEL_OPTIONS
from jobworker.v1 import jobworker_pb2 as pb
from jobworker.v1 import jobworker_pb2_grpc as pb_grpc

from .conftest import (
    PY,
    Server,
    ServerFactory,
    job,
    rpc_error,
    schedule,
    serve_expecting_failure,
    wait_until,
)

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
        # and the other services' (health, reflection) the same
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        assert rpc_error(lambda: check(garbage, timeout=10)).code() == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        watch = channel.unary_stream("/grpc.health.v1.Health/Watch")
        assert rpc_error(lambda: list(watch(garbage, timeout=10))).code() == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        info = channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
        )
        assert rpc_error(lambda: list(info(iter([garbage]), timeout=10))).code() == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
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


class _Follower:
    """A follow stream read on a thread: when it ended, and with what code."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.first = threading.Event()
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.ended_at = 0.0
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for _ in self.call:
                self.first.set()
            self.code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            self.code, self.details = exc.code(), exc.details() or ""
        self.ended_at = time.monotonic()
        self.first.set()


def _follow(stub: pb_grpc.JobWorkerServiceStub, cid: str) -> _Follower:
    follower = _Follower(
        stub.StreamBatchLogs(
            pb.StreamBatchLogsRequest(correlation_id=cid, follow=True), timeout=120
        )
    )
    assert follower.first.wait(30) and follower.code is None, follower.details
    return follower


def _sleeper(stub: pb_grpc.JobWorkerServiceStub) -> str:
    # echo first: the follower's first message says the stream is open. No root needed.
    return str(
        schedule(
            stub, job("/bin/sh", "-c", "echo started; exec sleep 120", name="s")
        ).correlation_id
    )


def test_a_role_taken_away_ends_open_calls_within_5s(make_server: ServerFactory) -> None:
    server = make_server()
    alice = server.stub("alice")
    cid = _sleeper(alice)
    follower = _follow(alice, cid)
    release = threading.Event()

    def requests() -> Iterator[pb.ScheduleBatchRequest]:
        yield job("/bin/true", name="u")
        release.wait(60)  # an upload that is slow to send its next message

    upload: dict[str, object] = {}

    def send() -> None:
        try:
            alice.ScheduleBatch(requests(), timeout=120)
        except grpc.RpcError as exc:
            upload["code"], upload["at"] = exc.code(), time.monotonic()

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    time.sleep(0.5)  # the upload's first message is read
    try:
        # alice becomes a viewer: her upload must end, her follow may go on
        text = server.config.read_text().replace(
            "[auth.roles]\n", '[auth.roles]\nalice = "viewer"\n'
        )
        server.config.write_text(text)
        reloaded = time.monotonic()
        server.signal(signal.SIGHUP)
        wait_until(lambda: "code" in upload, 10, "the upload ended")
        assert upload["code"] == grpc.StatusCode.PERMISSION_DENIED
        assert float(upload["at"]) - reloaded < 5  # type: ignore[arg-type]
        assert follower.code is None  # a viewer may still read
        # then role none: the follower ends too
        server.config.write_text(text.replace('alice = "viewer"', 'alice = "none"'))
        reloaded = time.monotonic()
        server.signal(signal.SIGHUP)
        follower.thread.join(10)
        assert follower.code == grpc.StatusCode.PERMISSION_DENIED, (follower.code, follower.details)
        assert follower.ended_at - reloaded < 5
        assert "none" in follower.details
    finally:
        release.set()
        server.stub("admin").CancelBatch(pb.CancelBatchRequest(correlation_id=cid), timeout=30)


def test_a_revoked_certificate_is_unauthenticated_and_its_calls_end(
    make_server: ServerFactory, pki: Path, tmp_path: Path
) -> None:
    own = tmp_path / "pki"
    shutil.copytree(pki, own)
    certs.issue_client(own, "carol")
    server = make_server(tls={"crl": str(own / "crl.pem")})
    channel = server.channel("carol", pki=own)
    carol = pb_grpc.JobWorkerServiceStub(channel)
    cid = _sleeper(carol)
    follower = _follow(carol, cid)
    try:
        result = CliRunner().invoke(main, ["certs", "revoke", "carol", "--dir", str(own)])
        assert result.exit_code == 0, result.output
        assert "revoked serial" in result.output
        revoked = time.monotonic()
        follower.thread.join(10)
        assert follower.code == grpc.StatusCode.UNAUTHENTICATED, (follower.code, follower.details)
        assert follower.ended_at - revoked < 5
        err = rpc_error(lambda: carol.ListBatches(pb.ListBatchesRequest(), timeout=10))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "revoked" in (err.details() or "")
        # a CRL the CA did not sign is refused, logged, and the one in force kept
        other_ca, other_key = certs.new_ca("someone else")
        forged = tmp_path / "forged"
        forged.mkdir()
        (forged / "ca.pem").write_bytes((own / "ca.pem").read_bytes())
        certs.write_crl(certs.PkiPaths.in_dir(forged), other_ca, other_key, [])
        (own / "crl.pem").write_bytes((forged / "crl.pem").read_bytes())
        server.wait_for_log("crl_refused", timeout=10)
        assert rpc_error(lambda: carol.ListBatches(pb.ListBatchesRequest(), timeout=10)).code() == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        assert server.stub("alice").ListBatches(pb.ListBatchesRequest(), timeout=10) is not None
    finally:
        channel.close()
        server.stub("admin").CancelBatch(pb.CancelBatchRequest(correlation_id=cid), timeout=30)


def test_a_client_that_pings_too_often_is_dropped_and_ours_is_not(
    make_server: ServerFactory,
) -> None:
    server = make_server()
    alice = server.stub("alice")
    cid = _sleeper(alice)
    creds = grpc.ssl_channel_credentials(
        root_certificates=(server.pki / "ca.pem").read_bytes(),
        private_key=(server.pki / "alice-key.pem").read_bytes(),
        certificate_chain=(server.pki / "alice.pem").read_bytes(),
    )
    pinger = grpc.secure_channel(
        server.address,
        creds,
        options=[
            ("grpc.keepalive_time_ms", 200),
            ("grpc.keepalive_timeout_ms", 5000),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.keepalive_permit_without_calls", 1),
        ],
    )
    ours: grpc.Channel | None = None
    try:
        follower = _follow(pb_grpc.JobWorkerServiceStub(pinger), cid)
        # The project's client's policy (client.py), pinging every 6 s instead of 30 s: still
        # above the server's 5 s minimum, so two pings happen within the test.
        options = dict(CHANNEL_OPTIONS) | {"grpc.keepalive_time_ms": 6000}
        ours = grpc.secure_channel(server.address, creds, options=list(options.items()))
        polite = _follow(pb_grpc.JobWorkerServiceStub(ours), cid)
        follower.thread.join(30)
        assert follower.code == grpc.StatusCode.UNAVAILABLE, (follower.code, follower.details)
        polite.thread.join(14)
        assert polite.code is None, (polite.code, polite.details)  # ours goes on
    finally:
        pinger.close()
        if ours is not None:
            ours.close()
        server.stub("admin").CancelBatch(pb.CancelBatchRequest(correlation_id=cid), timeout=30)
