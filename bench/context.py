"""What every benchmark shares in one run: sizes, the work folders, certificates, servers."""

from __future__ import annotations

import itertools
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import ServerProcess, make_pki, write_config

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config" / "jobworker.toml"  # what `make run` serves with


def default_data_dir() -> Path:
    """Where `make run` keeps its data: config/jobworker.toml's server.data_dir (relative
    paths are resolved against the config's folder), `var/data` in the checkout."""
    try:
        value = tomllib.loads(CONFIG.read_text())["server"]["data_dir"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        value = "../var/data"
    path = Path(value)
    return (path if path.is_absolute() else CONFIG.parent / path).resolve()


@dataclass(frozen=True)
class Sizes:
    """How big each benchmark is; --quick shrinks them for a smoke run."""

    reps: int
    schedule_jobs: int  # jobs of the throughput batch, and of each peer's run
    record_batches: int  # batches of `record_batch_jobs` jobs, for memory and restart
    record_batch_jobs: int
    restart_reps: int
    follow_bytes: int
    fanout_followers: int
    fanout_bytes: int
    latency_lines: int
    running_jobs: int  # `sleep` jobs running while the server restarts (and for memory)
    load_clients: int
    load_seconds: float
    loaded_rate: int  # jobs/s of other work while line latency is measured under load

    @classmethod
    def full(cls) -> Sizes:
        return cls(3, 2000, 1000, 10, 5, 1 << 30, 50, 64 << 20, 500, 1000, 200, 60.0, 500)

    @classmethod
    def quick(cls) -> Sizes:
        return cls(1, 500, 100, 10, 2, 128 << 20, 50, 8 << 20, 100, 1000, 200, 10.0, 500)


@dataclass
class Context:
    """The run's work folders, certificates and the populated data folder, made once."""

    work: Path  # servers' data for the older figures (tmpfs when there is one)
    sizes: Sizes
    disk: Path  # a fresh folder beside `make run`'s data (same file system), for the rest
    verbose: bool = True
    pki: Path = field(init=False)
    record_dir: Path | None = None  # a data_dir holding the finished record batches
    record_info: dict[str, object] = field(default_factory=dict)
    limits_line: dict[str, object] | None = None
    missing: dict[str, str] = field(default_factory=dict)  # a peer not run: why
    _counter: itertools.count[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.pki = make_pki(self.work / "pki")

    def fresh_dir(self, stem: str, on_disk: bool = False) -> Path:
        """A new empty folder under the work folder (or under `disk`)."""
        path = (self.disk if on_disk else self.work) / f"{stem}-{next(self._counter)}"
        path.mkdir(parents=True)
        return path

    def server(
        self,
        stem: str,
        data_dir: Path | None = None,
        port: int = 0,
        on_disk: bool = False,
        **sections: dict[str, object],
    ) -> ServerProcess:
        """A (not yet started) jobworker server with its own config and data folder: in
        the work folder, or `on_disk` beside `make run`'s data."""
        folder = self.fresh_dir(stem, on_disk)
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
