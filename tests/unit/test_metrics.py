"""Metrics: what each event does to the numbers, and the HTTP endpoint."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import prometheus_client
import pytest

from jobworker.metrics import JOB_BUCKETS, Metrics
from jobworker.model import JobEvent, JobState, JobStatus


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


@dataclass
class FakeBatch:
    """Just what the metrics read of a batch."""

    root: Path
    statuses: list[JobStatus] = field(default_factory=list)

    def job_dir(self, index: int) -> Path:
        return self.root / "jobs" / str(index)


def ended(
    batch: FakeBatch, index: int, state: JobState, *, start: float | None, end: float
) -> JobEvent:
    """Record job `index` as the store would (status first), and the event the engine emits."""
    batch.statuses[index] = JobStatus(state=state, start_time=start, end_time=end)
    return JobEvent(seq=1, index=index, state=state, time=end)


def test_metrics_live_on_their_own_registry() -> None:
    m = Metrics()
    assert m.registry is not prometheus_client.REGISTRY
    assert prometheus_client.REGISTRY.get_sample_value("jobworker_jobs_started_total") is None
    Metrics()  # a second server in the same process does not collide


def test_process_and_build_info_are_exported() -> None:
    m = Metrics()
    assert value(m, "process_resident_memory_bytes")
    assert value(m, "process_cpu_seconds_total") is not None
    info = [s for f in m.registry.collect() for s in f.samples if s.name == "jobworker_build_info"]
    assert len(info) == 1 and info[0].value == 1
    assert set(info[0].labels) == {"version", "python"}


def test_known_label_values_start_at_zero() -> None:
    m = Metrics()
    for state in ("SUCCEEDED", "FAILED", "TIMED_OUT", "CANCELED", "SKIPPED", "LOST"):
        assert value(m, "jobworker_jobs_ended_total", state=state) == 0
    assert value(m, "jobworker_config_reloads_total", outcome="failure") == 0
    assert value(m, "jobworker_output_bytes_total", stream="stderr") == 0
    assert value(m, "jobworker_rpcs_total", method="GetBatch", code="OK") == 0


def test_rpcs_count_by_method_and_code_and_time_by_method() -> None:
    m = Metrics()
    m.observe_rpc("GetBatch", "OK", 0.002)
    m.observe_rpc("GetBatch", "NOT_FOUND", 0.003)
    m.observe_rpc("GetBatch", "OK", 0.5)
    assert value(m, "jobworker_rpcs_total", method="GetBatch", code="OK") == 2
    assert value(m, "jobworker_rpcs_total", method="GetBatch", code="NOT_FOUND") == 1
    assert value(m, "jobworker_rpc_duration_seconds_count", method="GetBatch") == 3
    assert value(m, "jobworker_rpc_duration_seconds_bucket", method="GetBatch", le="0.005") == 2


def test_a_job_that_ran_counts_start_end_duration_and_its_output(tmp_path: Path) -> None:
    m = Metrics()
    batch = FakeBatch(tmp_path, [JobStatus()])
    folder = batch.job_dir(0)
    folder.mkdir(parents=True)
    (folder / "stdout").write_bytes(b"x" * 1000)
    (folder / "stderr").write_bytes(b"e" * 7)
    batch.statuses[0] = JobStatus(state=JobState.RUNNING, start_time=100.0)
    m.on_job_event(batch, JobEvent(seq=1, index=0, state=JobState.RUNNING, time=100.0))
    assert value(m, "jobworker_jobs_started_total") == 1
    m.on_job_event(batch, ended(batch, 0, JobState.FAILED, start=100.0, end=102.5))
    assert value(m, "jobworker_jobs_ended_total", state="FAILED") == 1
    assert value(m, "jobworker_job_duration_seconds_sum") == 2.5
    assert value(m, "jobworker_output_bytes_total", stream="stdout") == 1000
    assert value(m, "jobworker_output_bytes_total", stream="stderr") == 7


def test_a_job_that_never_ran_counts_its_end_only(tmp_path: Path) -> None:
    m = Metrics()
    batch = FakeBatch(tmp_path, [JobStatus()])
    m.on_job_event(batch, ended(batch, 0, JobState.SKIPPED, start=None, end=5.0))
    assert value(m, "jobworker_jobs_ended_total", state="SKIPPED") == 1
    assert value(m, "jobworker_job_duration_seconds_count") == 0
    assert value(m, "jobworker_jobs_started_total") == 0


def test_a_lost_job_counts_its_output_but_not_a_duration(tmp_path: Path) -> None:
    m = Metrics()
    batch = FakeBatch(tmp_path, [JobStatus()])
    batch.job_dir(0).mkdir(parents=True)
    (batch.job_dir(0) / "stdout").write_bytes(b"abc")  # no stderr file: counted as nothing
    m.on_job_event(batch, ended(batch, 0, JobState.LOST, start=1.0, end=9999.0))
    assert value(m, "jobworker_jobs_ended_total", state="LOST") == 1
    assert value(m, "jobworker_job_duration_seconds_count") == 0
    assert value(m, "jobworker_output_bytes_total", stream="stdout") == 3
    assert value(m, "jobworker_output_bytes_total", stream="stderr") == 0


def test_job_duration_buckets_run_from_10ms_to_a_day() -> None:
    assert JOB_BUCKETS[0] == 0.01
    assert JOB_BUCKETS[-1] == 86400.0
    assert list(JOB_BUCKETS) == sorted(JOB_BUCKETS)


def test_gauges_read_their_sources_at_each_scrape() -> None:
    m = Metrics()
    figures = {"queued": 3, "running": 2, "batches": 10, "max": 8}
    m.watch(
        queued=lambda: figures["queued"],
        running=lambda: figures["running"],
        batches=lambda: figures["batches"],
        max_concurrent=lambda: figures["max"],
    )
    assert value(m, "jobworker_jobs_queued") == 3
    figures["queued"] = 0
    figures["max"] = 1
    assert value(m, "jobworker_jobs_queued") == 0
    assert value(m, "jobworker_jobs_running") == 2
    assert value(m, "jobworker_batches") == 10
    assert value(m, "jobworker_jobs_max_concurrent") == 1


def test_streams_go_up_and_down() -> None:
    m = Metrics()
    m.on_stream(1)
    m.on_stream(1)
    m.on_stream(-1)
    assert value(m, "jobworker_streams_active") == 1


def test_reloads_count_by_outcome_and_the_last_one_is_remembered() -> None:
    m = Metrics()
    assert value(m, "jobworker_config_last_reload_success") == 1  # the start counts
    started = value(m, "jobworker_config_last_reload_success_timestamp_seconds")
    assert started
    m.config_reloaded(False)
    assert value(m, "jobworker_config_reloads_total", outcome="failure") == 1
    assert value(m, "jobworker_config_last_reload_success") == 0
    assert value(m, "jobworker_config_last_reload_success_timestamp_seconds") == started
    m.config_reloaded(True)
    assert value(m, "jobworker_config_reloads_total", outcome="success") == 1
    assert value(m, "jobworker_config_last_reload_success") == 1
    assert value(m, "jobworker_config_last_reload_success_timestamp_seconds") >= started  # type: ignore[operator]


def test_the_endpoint_serves_the_text_format_on_a_free_port_and_stops() -> None:
    m = Metrics()
    m.jobs_started.inc(4)
    address = m.serve("127.0.0.1:0")
    host, port = address.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
            text = response.read().decode()
            kind = response.headers["Content-Type"]
    finally:
        m.close()
    assert kind.startswith("text/plain")
    assert "jobworker_jobs_started_total 4.0" in text
    assert "process_resident_memory_bytes" in text
    assert "_created" not in text
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{address}/metrics", timeout=2)
