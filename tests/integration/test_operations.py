"""Operations (issue 5): live reload, logs, metrics, TLS rotation, health; a real server."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import ssl
import threading
import tomllib
import urllib.request
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from jobworker import certs
from jobworker.v1 import jobworker_pb2 as pb
from jobworker.v1 import jobworker_pb2_grpc as pb_grpc

from .conftest import (
    Server,
    ServerFactory,
    job,
    rpc_error,
    schedule,
    serve_expecting_failure,
    wait_batch,
    wait_until,
    write_config,
)

SERVICE = "jobworker.v1.JobWorkerService"
METRICS_ON = {"listen": "127.0.0.1:0"}
# A job that says it started, then waits for the test's go-ahead: concurrency without clocks.
WAIT_FOR_GO = 'echo started > "$1"; while [ ! -e "$2" ]; do sleep 0.02; done'


# ---------------------------------------------------------------------------- helpers


_SERVER_SECTION: dict[Path, dict[str, object]] = {}


def rewrite(path: Path, server: Server, data_dir: Path, /, **sections: dict[str, object]) -> None:
    """Replace the config file the way editors do (write a temp file, rename it over).

    [server] keeps what the file had (such as the test's own cgroup_root) unless overridden."""
    # A file a test broke on purpose does not parse: keep what it had before.
    with contextlib.suppress(tomllib.TOMLDecodeError):
        _SERVER_SECTION[path] = tomllib.loads(path.read_text()).get("server", {})
    sections["server"] = _SERVER_SECTION[path] | sections.get("server", {})
    temp = path.with_name(f".{path.name}.tmp")
    write_config(temp, server.pki, data_dir, **sections)
    os.replace(temp, path)


def next_event(
    server: Server, name: str, action: object, timeout: float = 30.0
) -> dict[str, object]:
    """Run `action` (a callable) and return the next log line named `name` after it."""
    before = len(server.events(name))
    action()  # type: ignore[operator]
    return server.wait_for_log(name, timeout=timeout, count=before + 1)[before]


def scrape(server: Server) -> dict[str, float]:
    """/metrics as {'name{label="value",...}': value}, labels sorted."""
    assert server.metrics_port, "the server logged no metrics_ready line"
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def wait_metric(server: Server, key: str, expected: float, timeout: float = 30.0) -> None:
    seen: list[float | None] = []

    def reached() -> bool:
        seen.append(scrape(server).get(key))
        return seen[-1] == expected

    try:
        wait_until(reached, timeout, f"{key} == {expected}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen {seen[-1] if seen else None}") from None


def seconds(ts: object) -> float:
    return ts.seconds + ts.nanos / 1e9  # type: ignore[attr-defined, no-any-return]


def assert_one_at_a_time(batch: pb.Batch) -> None:
    """Each job started after the one before it had ended (by the server's own clock)."""
    spans = sorted((seconds(j.start_time), seconds(j.end_time)) for j in batch.jobs)
    assert all(j.state == pb.JOB_STATE_SUCCEEDED for j in batch.jobs), batch
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end, f"jobs overlapped: {spans}"


def run_three_short_jobs(server: Server) -> pb.Batch:
    stub = server.stub("alice")
    cid = schedule(
        stub, *(job("/bin/sh", "-c", "sleep 0.2", name=f"j{i}") for i in range(3))
    ).correlation_id
    batch = wait_batch(stub, cid, timeout=60)
    assert batch.state == pb.BATCH_STATE_SUCCEEDED, batch
    return batch


def schedule_gated(stub: object, tmp_path: Path) -> tuple[str, list[Path], Path]:
    """Three jobs that each mark when they start, then wait for the file `go`."""
    go = tmp_path / "go"
    marks = [tmp_path / f"started-{i}" for i in range(3)]
    cid = schedule(
        stub,  # type: ignore[arg-type]
        *(
            job("/bin/sh", "-c", WAIT_FOR_GO, "sh", str(marks[i]), str(go), name=f"p{i}")
            for i in range(3)
        ),
    ).correlation_id
    return cid, marks, go


def three_run_together(server: Server, tmp_path: Path) -> None:
    """Three jobs are running at the same moment (each waits until all three have started)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    tmp_path.chmod(0o777)  # the jobs run as nobody
    stub = server.stub("alice")
    cid, marks, go = schedule_gated(stub, tmp_path)
    try:
        wait_until(lambda: all(m.exists() for m in marks), 60, "three jobs running together")
    finally:
        go.touch()
    assert wait_batch(stub, cid, timeout=60).state == pb.BATCH_STATE_SUCCEEDED


def presented_certificate(server: Server, pki: Path) -> bytes:
    """The DER certificate the server presents to a new TLS connection (a real client cert)."""
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    context.load_cert_chain(pki / "alice.pem", pki / "alice-key.pem")
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock,
        context.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def der_of(pem_file: Path) -> bytes:
    return x509.load_pem_x509_certificate(pem_file.read_bytes()).public_bytes(Encoding.DER)


def own_pki(pki: Path, tmp_path: Path) -> Path:
    """A copy of the test CA and certificates that this test may rotate."""
    directory = tmp_path / "pki"
    shutil.copytree(pki, directory)
    return directory


def tls_section(directory: Path) -> dict[str, object]:
    return {
        "ca_cert": str(directory / "ca.pem"),
        "server_cert": str(directory / "server.pem"),
        "server_key": str(directory / "server-key.pem"),
    }


# ---------------------------------------------------------------------------- dynamic config


def test_lowering_max_concurrent_in_the_file_serialises_the_next_jobs(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    server = make_server(data, jobs={"max_concurrent": 8})
    three_run_together(server, tmp_path / "before")

    line = next_event(
        server,
        "config_reloaded",
        lambda: rewrite(server.config, server, data, jobs={"max_concurrent": 1}),
    )
    assert line["trigger"] == "file changed"
    assert line["changed"] == ["jobs.max_concurrent"]
    assert_one_at_a_time(run_three_short_jobs(server))


def test_sighup_reloads_a_file_the_watcher_cannot_see(
    make_server: ServerFactory, tmp_path: Path, pki: Path
) -> None:
    # The config is a symlink to a file in another folder: editing that file makes no event
    # in the watched folder, so only SIGHUP can bring the change in.
    real = tmp_path / "real" / "jobworker.toml"
    real.parent.mkdir()
    link = tmp_path / "etc" / "jobworker.toml"
    link.parent.mkdir()
    link.symlink_to(real)
    data = tmp_path / "data"
    write_config(real, pki, data, jobs={"max_concurrent": 8})
    server = Server(link, pki).start()
    try:
        three_run_together(server, tmp_path / "before")
        rewrite(real, server, data, jobs={"max_concurrent": 1})
        line = next_event(server, "config_reloaded", lambda: server.signal(signal.SIGHUP))
        assert line["trigger"] == "SIGHUP"
        assert line["changed"] == ["jobs.max_concurrent"]
        assert_one_at_a_time(run_three_short_jobs(server))
        assert [e["trigger"] for e in server.events("config_reloaded")] == ["SIGHUP"]
    finally:
        server.stop()


def test_raising_max_concurrent_starts_queued_jobs_at_once(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    server = make_server(data, jobs={"max_concurrent": 1})
    stub = server.stub("alice")
    cid, marks, go = schedule_gated(stub, tmp_path)
    try:
        wait_until(marks[0].exists, 60, "the first job running")
        # Two wait in the queue behind the one running; raising the limit starts them now,
        # while the first is still running.
        rewrite(server.config, server, data, jobs={"max_concurrent": 3})
        wait_until(lambda: all(m.exists() for m in marks), 60, "all three running together")
    finally:
        go.touch()
    assert wait_batch(stub, cid, timeout=60).state == pb.BATCH_STATE_SUCCEEDED


def test_a_role_changed_in_the_file_applies_to_the_next_call(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    server = make_server(data)
    with server.channel("bob") as channel:
        bob = pb_grpc.JobWorkerServiceStub(channel)
        bob.ListBatches(pb.ListBatchesRequest(), timeout=10)  # role "user" by default
        next_event(
            server,
            "config_reloaded",
            lambda: rewrite(server.config, server, data, auth__roles={"bob": "none"}),
        )
        # The same connection, the next call: refused.
        error = rpc_error(lambda: bob.ListBatches(pb.ListBatchesRequest(), timeout=10))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    # The server writes an RPC's audit line before it answers; this harness reads the
    # lines on a thread of its own, so wait until it has read both.
    server.wait_for_log("rpc", count=2)
    audit = [e for e in server.events("rpc") if e["identity"] == "bob"]
    assert [e["code"] for e in audit] == ["OK", "PERMISSION_DENIED"]


def test_an_invalid_file_changes_nothing_and_is_logged_and_counted(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    server = make_server(data, metrics=METRICS_ON, jobs={"max_concurrent": 1})
    assert scrape(server)["jobworker_config_last_reload_success"] == 1

    line = next_event(
        server,
        "config_reload_failed",
        lambda: rewrite(
            server.config,
            server,
            data,
            metrics=METRICS_ON,
            jobs={"max_concurrent": 0},
            auth__roles={"bob": "none"},
        ),
    )
    error = str(line["error"])
    assert "jobs.max_concurrent = 0 (line " in error, error
    assert "must be an integer from 1 to 10000" in error
    assert line["level"] == "error"

    # Still serving, with the old config: bob keeps his role, and jobs still run one at a time.
    server.stub("bob").ListBatches(pb.ListBatchesRequest(), timeout=10)
    assert_one_at_a_time(run_three_short_jobs(server))
    metrics = scrape(server)
    assert metrics['jobworker_config_reloads_total{outcome="failure"}'] == 1
    assert metrics['jobworker_config_reloads_total{outcome="success"}'] == 0
    assert metrics["jobworker_config_last_reload_success"] == 0
    assert metrics["jobworker_jobs_max_concurrent"] == 1

    # A file that is not TOML at all: refused the same way, the line named.
    def garble() -> None:
        server.config.write_text(server.config.read_text() + "\n[jobs\n")

    line = next_event(server, "config_reload_failed", garble)
    assert "invalid TOML" in str(line["error"]) and "line" in str(line["error"])

    # Fixed: applied, and the metric says so.
    next_event(
        server,
        "config_reloaded",
        lambda: rewrite(
            server.config, server, data, metrics=METRICS_ON, jobs={"max_concurrent": 2}
        ),
    )
    metrics = scrape(server)
    assert metrics['jobworker_config_reloads_total{outcome="failure"}'] == 2
    assert metrics['jobworker_config_reloads_total{outcome="success"}'] == 1
    assert metrics["jobworker_config_last_reload_success"] == 1
    assert metrics["jobworker_jobs_max_concurrent"] == 2


def test_keys_that_need_a_restart_are_named_and_keep_their_values(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    server = make_server(data, metrics=METRICS_ON)
    sections: dict[str, dict[str, object]] = {
        "metrics": {"listen": "127.0.0.1:1"},
        "server": {"listen": "127.0.0.1:1", "data_dir": str(data), "shutdown_grace": "7s"},
        "jobs": {"max_concurrent": 3},
    }
    line = next_event(
        server, "config_restart_needed", lambda: rewrite(server.config, server, data, **sections)
    )
    assert line["keys"] == ["server.listen", "server.shutdown_grace", "metrics.listen"]
    reloaded = server.events("config_reloaded")[-1]
    assert reloaded["changed"] == ["jobs.max_concurrent"]
    # Still where it was, with the reloadable change applied.
    assert scrape(server)["jobworker_jobs_max_concurrent"] == 3
    server.stub("alice").ListBatches(pb.ListBatchesRequest(), timeout=10)


def test_the_log_level_is_reloadable(make_server: ServerFactory, tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = make_server(data)
    stub = server.stub("alice")
    next_event(
        server,
        "config_reloaded",
        lambda: rewrite(server.config, server, data, logging={"level": "warning"}),
    )
    stub.ListBatches(pb.ListBatchesRequest(), timeout=10)  # its audit line is at info: not written
    next_event(
        server,
        "config_reloaded",
        lambda: rewrite(server.config, server, data, logging={"level": "info"}),
    )
    with pytest.raises(grpc.RpcError):
        stub.GetBatch(pb.GetBatchRequest(correlation_id="no-such-batch"), timeout=10)
    server.wait_for_log("rpc")
    # Lines come in order: the GetBatch line is there, so the ListBatches one would be too.
    assert [e["method"] for e in server.events("rpc")] == ["GetBatch"]


# ---------------------------------------------------------------------------- logs


def test_log_lines_are_json_and_name_the_batch_job_and_identity(make_server: ServerFactory) -> None:
    server = make_server()
    stub = server.stub("bob")
    cid = schedule(
        stub, job("/bin/sh", "-c", "echo out", name="first"), job("/bin/false", name="second")
    ).correlation_id
    wait_batch(stub, cid)
    server.wait_for_log("job_ended", count=2)
    server.stop()

    for raw in server.raw:
        assert isinstance(json.loads(raw), dict), raw  # every line, the server's and libraries'
    about = [e for e in server.lines if e.get("correlation_id") == cid]
    events = {e["event"] for e in about}
    assert {"batch_scheduled", "job_ended", "rpc"} <= events
    assert "job_started" not in events  # debug: one info line a job, at its end
    for line in about:
        assert line["identity"] == "bob", line
        assert line["level"] and line["timestamp"], line
    jobs = {
        (e["job_index"], e["job_name"], e.get("state")) for e in about if e["event"] == "job_ended"
    }
    assert jobs == {(0, "first", "SUCCEEDED"), (1, "second", "FAILED")}
    for ended in (e for e in about if e["event"] == "job_ended"):
        assert ended["pid"] > 0 and ended["seconds"] >= 0, ended
    (audit,) = [e for e in about if e["event"] == "rpc" and e["method"] == "ScheduleBatch"]
    assert audit["code"] == "OK"
    assert isinstance(audit["duration_ms"], float)


# ---------------------------------------------------------------------------- metrics


def test_metrics_move_when_jobs_run(make_server: ServerFactory, tmp_path: Path) -> None:
    server = make_server(metrics=METRICS_ON)
    assert server.events("metrics_ready")[0]["address"] == f"127.0.0.1:{server.metrics_port}"
    stub = server.stub("alice")
    go = tmp_path / "go"
    mark = tmp_path / "started"
    cid = schedule(
        stub,
        job("/bin/sh", "-c", "printf hello; printf 'oops!' >&2", name="writes"),
        job("/bin/sh", "-c", "exit 3", name="fails"),
        job("/bin/sh", "-c", WAIT_FOR_GO, "sh", str(mark), str(go), name="waits"),
    ).correlation_id
    wait_until(mark.exists, 60, "the waiting job running")
    wait_metric(server, "jobworker_jobs_running", 1)

    # A follower of the batch is an active stream while the job runs.
    responses: list[object] = []
    follow = stub.StreamBatchLogs(pb.StreamBatchLogsRequest(correlation_id=cid, follow=True))
    reader = threading.Thread(target=lambda: responses.extend(follow), daemon=True)
    reader.start()
    wait_metric(server, "jobworker_streams_active", 1)
    go.touch()
    reader.join(60)
    assert not reader.is_alive()
    wait_batch(stub, cid)

    wait_metric(server, "jobworker_streams_active", 0)
    m = scrape(server)
    assert m["jobworker_jobs_started_total"] == 3
    assert m['jobworker_jobs_ended_total{state="SUCCEEDED"}'] == 2
    assert m['jobworker_jobs_ended_total{state="FAILED"}'] == 1
    assert m["jobworker_jobs_running"] == 0
    assert m["jobworker_jobs_queued"] == 0
    assert m["jobworker_job_duration_seconds_count"] == 3
    assert m['jobworker_output_bytes_total{stream="stdout"}'] == len("hello")
    assert m['jobworker_output_bytes_total{stream="stderr"}'] == len("oops!")
    assert m["jobworker_batches"] == 1
    assert m['jobworker_rpcs_total{code="OK",method="ScheduleBatch"}'] == 1
    assert m['jobworker_rpcs_total{code="OK",method="StreamBatchLogs"}'] == 1
    assert m['jobworker_rpc_duration_seconds_count{method="ScheduleBatch"}'] == 1
    assert m["process_resident_memory_bytes"] > 0
    assert [k for k in m if k.startswith("jobworker_build_info")]


def test_refused_calls_are_counted_by_code(make_server: ServerFactory) -> None:
    server = make_server(metrics=METRICS_ON)
    error = rpc_error(
        lambda: server.stub("nobody").ListBatches(pb.ListBatchesRequest(), timeout=10)
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    wait_metric(server, 'jobworker_rpcs_total{code="PERMISSION_DENIED",method="ListBatches"}', 1)


# ---------------------------------------------------------------------------- certificates


def test_a_renewed_server_certificate_is_presented_to_new_connections(
    make_server: ServerFactory, tmp_path: Path, pki: Path
) -> None:
    directory = own_pki(pki, tmp_path)
    server = make_server(tls=tls_section(directory))
    old = der_of(directory / "server.pem")
    assert presented_certificate(server, directory) == old
    channel = server.channel("alice")  # an existing connection, made before the renewal
    pb_grpc.JobWorkerServiceStub(channel).ListBatches(pb.ListBatchesRequest(), timeout=10)

    certs.issue_server(directory, ["localhost", "127.0.0.1"])  # what `certs renew-server` does
    new = der_of(directory / "server.pem")
    assert new != old
    wait_until(lambda: presented_certificate(server, directory) == new, 30, "the new certificate")
    assert server.wait_for_log("tls_reloaded")[0]["serial"]
    # New gRPC connections work with it, and the existing one keeps working.
    server.stub("alice").ListBatches(pb.ListBatchesRequest(), timeout=10)
    pb_grpc.JobWorkerServiceStub(channel).ListBatches(pb.ListBatchesRequest(), timeout=10)
    channel.close()


def test_tls_paths_changed_in_the_config_apply_and_a_bad_pair_is_refused(
    make_server: ServerFactory, tmp_path: Path, pki: Path
) -> None:
    first = own_pki(pki, tmp_path / "a")
    second = own_pki(pki, tmp_path / "b")
    certs.issue_server(second, ["localhost"])
    data = tmp_path / "data"
    server = make_server(data, tls=tls_section(first))

    mixed = tls_section(second) | {"server_key": str(first / "server-key.pem")}
    line = next_event(
        server, "config_reload_failed", lambda: rewrite(server.config, server, data, tls=mixed)
    )
    assert "does not match" in str(line["error"])
    assert presented_certificate(server, first) == der_of(first / "server.pem")

    next_event(
        server,
        "config_reloaded",
        lambda: rewrite(server.config, server, data, tls=tls_section(second)),
    )
    assert presented_certificate(server, second) == der_of(second / "server.pem")


# ---------------------------------------------------------------------------- health


def test_health_is_serving_when_ready_and_not_serving_while_draining(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    server = make_server()
    channel = server.channel("viewer")  # any certificate of our CA may ask
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE):
        answer = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING

    # A job that ignores SIGTERM keeps the server draining for kill_grace (1s).
    mark = tmp_path / "started"
    stub = server.stub("alice")
    schedule(stub, job("/bin/sh", "-c", f"trap '' TERM; echo > {mark}; sleep 60", name="stubborn"))
    wait_until(mark.exists, 60, "the job running")
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    server.signal(signal.SIGTERM)
    statuses = []
    with contextlib.suppress(grpc.RpcError):  # the stream ends when the server stops
        statuses.extend(answer.status for answer in watch)
    assert statuses[:1] == [health_pb2.HealthCheckResponse.NOT_SERVING]
    server.signal(signal.SIGTERM)  # an impatient second SIGTERM does not cut the drain short
    assert server.proc is not None
    assert server.proc.wait(60) == 0  # drained: the stubborn job was killed after kill_grace
    server.stop()
    assert server.events("server_stopped")
    channel.close()


# ---------------------------------------------------------------------------- start-up


def test_a_busy_metrics_port_stops_the_start_with_a_clear_message(
    tmp_path: Path, pki: Path
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = f"127.0.0.1:{busy.getsockname()[1]}"
        config = write_config(
            tmp_path / "jobworker.toml", pki, tmp_path / "data", metrics={"listen": taken}
        )
        serve_expecting_failure(config, f"cannot serve metrics on {taken}")


def test_a_second_server_on_the_same_data_dir_refuses_to_start(
    make_server: ServerFactory, tmp_path: Path, pki: Path
) -> None:
    first = make_server()
    assert first.proc is not None
    config = write_config(tmp_path / "second.toml", pki, tmp_path / "data")
    serve_expecting_failure(
        config,
        f"data_dir {tmp_path / 'data'} is in use by another jobworker server",
        f"(pid {first.proc.pid})",
    )
    first.stop()  # the lock goes with the server: the next one starts
    make_server()


def test_a_second_server_on_the_same_port_refuses_to_start(
    make_server: ServerFactory, tmp_path: Path, pki: Path
) -> None:
    first = make_server()
    taken = f"127.0.0.1:{first.port}"
    config = write_config(
        tmp_path / "second.toml", pki, tmp_path / "other-data", server={"listen": taken}
    )
    serve_expecting_failure(config, f"cannot listen on {taken}")


SYS_TGKILL = {"x86_64": 234, "aarch64": 131}.get(os.uname().machine)


@pytest.mark.skipif(
    SYS_TGKILL is None, reason="tgkill's syscall number is known here only for x86_64 and aarch64"
)
def test_a_sigterm_delivered_to_any_thread_stops_the_server(make_server: ServerFactory) -> None:
    """The kernel may hand a process-wide signal to any thread. Sent here straight to a
    thread that is not the main one (tgkill), it must still stop the server."""
    import ctypes

    server = make_server()
    assert server.proc is not None
    pid = server.proc.pid
    others = [int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid]
    assert others
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(SYS_TGKILL, pid, others[0], int(signal.SIGTERM)) == 0
    assert server.proc.wait(timeout=30) == 0
    assert server.stop() == 0  # already ended: only closes the log pipe
    assert server.events("server_stopped")
