"""Prometheus metrics: one registry per server, fed by the interceptor, scheduler and reloads."""

from __future__ import annotations

import contextlib
import os
import platform
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)

from jobworker import __version__
from jobworker.model import JobEvent, JobState

# RPCs are quick or they are streams; streams run as long as a follower stays.
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
               30.0, 60.0, 300.0, 3600.0)  # fmt: skip
# Jobs run from milliseconds (`true`) to the default timeout (1h) and beyond: 10ms to a day.
JOB_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0,
               3 * 3600.0, 6 * 3600.0, 12 * 3600.0, 86400.0)  # fmt: skip

METHODS = ("ScheduleBatch", "GetBatch", "CancelBatch", "ListBatches", "StreamBatchLogs")
STREAMS = ("stdout", "stderr")


class _Batch(Protocol):
    """What the metrics read of a batch when one of its jobs changes state."""

    @property
    def statuses(self) -> Sequence[_Status]: ...
    def job_dir(self, index: int) -> Path: ...


class _Status(Protocol):
    @property
    def start_time(self) -> float | None: ...


class Metrics:
    """Every jobworker metric, on its own registry (never the process-global one)."""

    def __init__(self) -> None:
        # No `_created` series: they double the output and Prometheus ignores them in the
        # text format. (A process-wide switch; the server is the only exporter in its process.)
        disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated upstream
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.rpcs = Counter(
            "jobworker_rpcs",
            "RPCs answered, by method and status code.",
            ["method", "code"],
            registry=r,
        )
        self.rpc_duration = Histogram(
            "jobworker_rpc_duration_seconds",
            "Time from an RPC's arrival to its status, by method (streams: their whole life).",
            ["method"],
            buckets=RPC_BUCKETS,
            registry=r,
        )
        self._add_job_metrics(r)
        self._add_server_metrics(r)
        self.build_info.labels(__version__, platform.python_version()).set(1)
        # Every known label value exists from the start, so rate() and alerts see a 0
        # rather than nothing until the first event.
        # The labelled children, made once: they are used at every job's end.
        self._ended = {s: self.jobs_ended.labels(s.name) for s in JobState if s.ended}
        self._output = {stream: self.output_bytes.labels(stream) for stream in STREAMS}
        for outcome in ("success", "failure"):
            self.config_reloads.labels(outcome)
        for method in METHODS:
            self.rpc_duration.labels(method)
            self.rpcs.labels(method, "OK")
        self.config_loaded()
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def _add_job_metrics(self, r: CollectorRegistry) -> None:
        self.jobs_started = Counter(
            "jobworker_jobs_started", "Jobs whose process was started.", registry=r
        )
        self.jobs_ended = Counter(
            "jobworker_jobs_ended",
            "Jobs that reached an end state, by state.",
            ["state"],
            registry=r,
        )
        self.jobs_queued = Gauge(
            "jobworker_jobs_queued",
            "Jobs waiting to run now (ready, or waiting for their dependencies).",
            registry=r,
        )
        self.jobs_running = Gauge("jobworker_jobs_running", "Jobs running now.", registry=r)
        self.max_concurrent = Gauge(
            "jobworker_jobs_max_concurrent",
            "The jobs.max_concurrent in force: running == this means the server is full.",
            registry=r,
        )
        self.job_duration = Histogram(
            "jobworker_job_duration_seconds",
            "Run time of jobs that started, from start to end (LOST jobs are left out).",
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.output_bytes = Counter(
            "jobworker_output_bytes",
            "Bytes jobs wrote to their stdout and stderr files, counted when each job ends.",
            ["stream"],
            registry=r,
        )

    def _add_server_metrics(self, r: CollectorRegistry) -> None:
        self.streams_active = Gauge(
            "jobworker_streams_active", "StreamBatchLogs calls open now.", registry=r
        )
        self.batches = Gauge(
            "jobworker_batches",
            "Batches on record (running and ended, until retention).",
            registry=r,
        )
        self.config_reloads = Counter(
            "jobworker_config_reloads", "Config reloads, by outcome.", ["outcome"], registry=r
        )
        self.config_last_reload_success = Gauge(
            "jobworker_config_last_reload_success",
            "1 when the last config reload (or the start) succeeded, 0 when it failed.",
            registry=r,
        )
        self.config_last_reload_success_time = Gauge(
            "jobworker_config_last_reload_success_timestamp_seconds",
            "When the config was last loaded successfully (the start counts), Unix time.",
            registry=r,
        )
        self.build_info = Gauge(
            "jobworker_build_info",
            "Always 1; the labels say which jobworker and Python run.",
            ["version", "python"],
            registry=r,
        )

    # -- sources the gauges read at each scrape

    def watch(
        self,
        queued: Callable[[], float],
        running: Callable[[], float],
        batches: Callable[[], float],
        max_concurrent: Callable[[], float],
    ) -> None:
        """Read these at each scrape (they run on the HTTP thread: plain reads only)."""
        self.jobs_queued.set_function(queued)
        self.jobs_running.set_function(running)
        self.batches.set_function(batches)
        self.max_concurrent.set_function(max_concurrent)

    # -- events

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        """One RPC answered (the interceptor's observer)."""
        self.rpcs.labels(method, code).inc()
        self.rpc_duration.labels(method).observe(seconds)

    def on_stream(self, delta: int) -> None:
        """A log stream opened (+1) or closed (-1)."""
        self.streams_active.inc(delta)

    def on_job_event(self, batch: _Batch, event: JobEvent) -> None:
        """A job changed state (the scheduler's listener; called after the store applied it)."""
        if event.state is JobState.RUNNING:
            self.jobs_started.inc()
            return
        if not event.state.ended:
            return
        self._ended[event.state].inc()
        started = batch.statuses[event.index].start_time
        if started is None:
            return  # never ran: no process, no output
        if event.state is not JobState.LOST:  # LOST ends at the restart: downtime, not run time
            self.job_duration.observe(max(0.0, event.time - started))
        folder = os.fspath(batch.job_dir(event.index))
        for stream, counter in self._output.items():
            with contextlib.suppress(OSError):
                counter.inc(os.stat(f"{folder}/{stream}").st_size)

    def config_loaded(self) -> None:
        """The config was loaded (at start) or reloaded successfully."""
        self.config_last_reload_success.set(1)
        self.config_last_reload_success_time.set(time.time())

    def config_reloaded(self, ok: bool) -> None:
        """A reload ended: success applies the file, failure kept the running config."""
        self.config_reloads.labels("success" if ok else "failure").inc()
        if ok:
            self.config_loaded()
        else:
            self.config_last_reload_success.set(0)

    # -- exposition

    def serve(self, listen: str) -> str:
        """Serve /metrics on `listen` (host:port, port 0 picks one); the address bound."""
        host, _, port = listen.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        self._http, self._thread = start_http_server(int(port), addr=host, registry=self.registry)
        bound_port = self._http.server_address[1]
        return f"[{host}]:{bound_port}" if ":" in host else f"{host}:{bound_port}"

    def close(self) -> None:
        """Stop the HTTP server (blocks up to half a second: call it off the event loop)."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
