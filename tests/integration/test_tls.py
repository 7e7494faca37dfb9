"""Mutual TLS and identity: who is served, who is refused, and how (issue 2)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from jobworker import certs
from jobworker.v1 import jobworker_pb2 as pb
from jobworker.v1 import jobworker_pb2_grpc as pb_grpc

from .conftest import Server


def _list(channel: grpc.Channel) -> pb.ListBatchesResponse:
    return pb_grpc.JobWorkerServiceStub(channel).ListBatches(pb.ListBatchesRequest(), timeout=10)


def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value.code()


def test_client_with_a_good_certificate_is_served(server: Server) -> None:
    with server.channel("alice") as channel:
        assert isinstance(_list(channel), pb.ListBatchesResponse)


def test_no_client_certificate_is_refused_at_the_handshake(server: Server) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=(server.pki / "ca.pem").read_bytes())
    with grpc.secure_channel(server.address, creds) as channel:
        assert _code(lambda: _list(channel)) == grpc.StatusCode.UNAVAILABLE


def test_plaintext_is_refused(server: Server) -> None:
    with grpc.insecure_channel(server.address) as channel:
        assert _code(lambda: _list(channel)) == grpc.StatusCode.UNAVAILABLE


def _client_pair(
    tmp_path: Path,
    ca: tuple[object, object],
    name: str,
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> Path:
    cert, key = certs.sign_certificate(
        ca[0],  # type: ignore[arg-type]
        ca[1],  # type: ignore[arg-type]
        name,
        server=False,
        not_before=not_before,
        not_after=not_after,
    )
    certs.write_pair(cert, key, tmp_path / f"{name}.pem", tmp_path / f"{name}-key.pem")
    return tmp_path


def test_certificate_from_another_ca_is_refused(server: Server, tmp_path: Path) -> None:
    foreign = _client_pair(tmp_path, certs.new_ca("some other CA"), "alice")
    with server.channel("alice", pki=foreign) as channel:
        assert _code(lambda: _list(channel)) == grpc.StatusCode.UNAVAILABLE


def test_expired_certificate_is_refused(server: Server, tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    expired = _client_pair(
        tmp_path,
        certs.load_ca(server.pki),
        "alice",
        not_before=now - dt.timedelta(days=30),
        not_after=now - dt.timedelta(days=1),
    )
    with server.channel("alice", pki=expired) as channel:
        assert _code(lambda: _list(channel)) == grpc.StatusCode.UNAVAILABLE


def test_role_none_is_permission_denied(server: Server) -> None:
    with server.channel("nobody") as channel, pytest.raises(grpc.RpcError) as info:
        _list(channel)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "nobody" in (info.value.details() or "")


def test_health_answers_serving(server: Server) -> None:
    with server.channel("alice") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", "jobworker.v1.JobWorkerService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(server: Server) -> None:
    with server.channel("alice") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        reply = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=10)))
    names = {s.name for s in reply.list_services_response.service}
    assert "jobworker.v1.JobWorkerService" in names
    assert "grpc.health.v1.Health" in names


def test_audit_line_names_identity_method_and_code(server: Server) -> None:
    with server.channel("nobody") as channel, pytest.raises(grpc.RpcError):
        _list(channel)
    lines = server.wait_for_log("rpc")
    assert any(
        line["identity"] == "nobody"
        and line["method"] == "ListBatches"
        and line["code"] == "PERMISSION_DENIED"
        for line in server.events("rpc")
    ), lines
