"""What every benchmark shares in one run: sizes, the work folder, certificates, servers."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import ServerProcess, make_pki, write_config


@dataclass(frozen=True)
class Sizes:
    """How big each benchmark is; --quick shrinks them for a smoke run."""

    reps: int
    schedule_jobs: int
    record_batches: int  # batches of `record_batch_jobs` jobs, for memory and restart
    record_batch_jobs: int
    restart_reps: int
    follow_bytes: int
    fanout_followers: int
    fanout_bytes: int
    latency_lines: int

    @classmethod
    def full(cls) -> Sizes:
        return cls(3, 1000, 1000, 10, 5, 1 << 30, 50, 64 << 20, 500)

    @classmethod
    def quick(cls) -> Sizes:
        return cls(1, 200, 100, 10, 2, 128 << 20, 50, 8 << 20, 100)


@dataclass
class Context:
    """The run's work folder, certificates and the populated data folder, made once."""

    work: Path
    sizes: Sizes
    disk: Path = Path("var/bench")  # a folder on disk (when `work` is on tmpfs)
    verbose: bool = True
    pki: Path = field(init=False)
    record_dir: Path | None = None  # a data_dir holding the finished record batches
    record_info: dict[str, object] = field(default_factory=dict)
    limits_line: dict[str, object] | None = None
    _counter: itertools.count[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.pki = make_pki(self.work / "pki")

    def fresh_dir(self, stem: str) -> Path:
        """A new empty folder under the work folder."""
        path = self.work / f"{stem}-{next(self._counter)}"
        path.mkdir(parents=True)
        return path

    def server(
        self, stem: str, data_dir: Path | None = None, port: int = 0, **sections: dict[str, object]
    ) -> ServerProcess:
        """A (not yet started) jobworker server with its own config and data folder."""
        folder = self.fresh_dir(stem)
        config = write_config(
            folder / "jobworker.toml", self.pki, data_dir or folder / "data", port, **sections
        )
        return ServerProcess(config)

    def note_limits(self, server: ServerProcess) -> None:
        """Keep the server's limits_backend log line for the report."""
        if self.limits_line is None:
            self.limits_line = server.event("limits_backend")

    def log(self, text: str) -> None:
        if self.verbose:
            print(f"  {text}", flush=True)
