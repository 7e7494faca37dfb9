"""Validation of a batch as it streams in: every error names the job, its field and the limit."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from jobworker.config import JobsConfig
from jobworker.errors import InvalidArgument, ResourceExhausted
from jobworker.model import BatchOptions, JobSpec

MAX_NAME = 128
MAX_LABELS = 64
MAX_LABEL_KEY = 63
MAX_LABEL_VALUE = 256
MAX_IDEMPOTENCY_KEY = 256
MAX_EXECUTOR_NAME = 64  # a key of the [executors] table
MAX_TIMEOUT = 366 * 86400.0
MIN_MEMORY = 1 << 20
_CORES_TTL = 10.0  # seconds a count of online CPUs is trusted (os.cpu_count reads /sys)
_cores_seen: list[float] = [0.0, float("-inf")]  # [count, when]


def _cores() -> int:
    """Online CPUs (os.cpu_count(): a file read each time), counted again every few
    seconds so that CPUs brought online or offline count soon."""
    now = time.monotonic()
    if now - _cores_seen[1] > _CORES_TTL:
        _cores_seen[:] = [float(os.cpu_count() or 1), now]
    return int(_cores_seen[0])


def default_name(index: int) -> str:
    """The name of a job that sends none."""
    return f"job-{index}"


def _job(index: int, name: str) -> str:
    return f"job {index} ({name!r})" if name else f"job {index}"


def _no_nul(where: str, fld: str, value: str) -> None:
    if "\0" in value:
        raise InvalidArgument(f"{where}: {fld} contains a NUL byte")


@dataclass
class BatchBuilder:
    """Collects a batch message by message, validating each on arrival."""

    limits: JobsConfig
    options: BatchOptions | None = None
    specs: list[JobSpec] = field(default_factory=list)
    _names: dict[str, int] = field(default_factory=dict)
    _bytes: int = 0  # what the jobs so far hold in memory (spec_cost)

    def add_options(self, options: BatchOptions) -> None:
        """Take the batch options; only allowed before the first job, and only once."""
        if self.specs or self.options is not None:
            raise InvalidArgument(
                "options: BatchOptions must be the stream's first message, and appear once"
            )
        _check_options(options)
        self.options = options

    def check_counts(self, name: str, args: int, env: int, depends_on: int) -> None:
        """Refuse a job by its item counts, before its strings are made (each costs memory)."""
        index = len(self.specs)
        where = _job(index, name or default_name(index))
        limit = self.limits.max_args
        if args + env > limit:
            raise ResourceExhausted(
                f"{where}: argv and env have {args + env} items, over jobs.max_args ({limit})"
            )
        # Each must name another job of the batch, once: more cannot be valid.
        if depends_on >= self.limits.max_jobs_per_batch:
            raise InvalidArgument(
                f"{where}: depends_on names {depends_on} jobs; a batch has at most "
                f"jobs.max_jobs_per_batch ({self.limits.max_jobs_per_batch})"
            )

    def add_job(self, spec: JobSpec) -> JobSpec:
        """Validate one job, name it "job-<index>" if unnamed, and keep it."""
        index = len(self.specs)
        limit = self.limits.max_jobs_per_batch
        if index >= limit:
            raise ResourceExhausted(f"batch has more than jobs.max_jobs_per_batch ({limit}) jobs")
        name = spec.name or default_name(index)
        where = _job(index, name)
        if len(name) > MAX_NAME:
            raise InvalidArgument(f"{where}: name is {len(name)} characters, at most {MAX_NAME}")
        if any(c in name for c in "\0\n\r\t") or name != name.strip():
            raise InvalidArgument(f"{where}: name holds control characters or edge spaces")
        if name in self._names:
            raise InvalidArgument(
                f"{where}: name duplicates job {self._names[name]}; names must be unique"
            )
        self.check_counts(name, len(spec.argv), len(spec.env), len(spec.depends_on))
        self._bytes += _check_job(where, spec, self.limits)
        if self._bytes > self.limits.max_batch_bytes:
            raise ResourceExhausted(
                f"{where}: the batch's argv, env, stdin and depends_on hold {self._bytes} "
                f"bytes in memory, over jobs.max_batch_bytes ({self.limits.max_batch_bytes})"
            )
        if name != spec.name:
            spec = dataclasses.replace(spec, name=name)
        self._names[name] = index
        self.specs.append(spec)
        return spec

    def finish(self) -> tuple[BatchOptions, tuple[JobSpec, ...]]:
        """Cross-job checks once the stream is complete: a job at least, dependencies, no cycle."""
        if not self.specs:
            raise InvalidArgument("batch has no job: send at least one JobSpec")
        for i, spec in enumerate(self.specs):
            for dep in spec.depends_on:
                if dep not in self._names:
                    raise InvalidArgument(
                        f"{_job(i, spec.name)}: depends_on names unknown job {dep!r}"
                    )
        _check_acyclic(self.specs, self._names)
        return self.options or BatchOptions(), tuple(self.specs)


def _check_options(o: BatchOptions) -> None:
    if len(o.labels) > MAX_LABELS:
        raise InvalidArgument(f"options: labels has {len(o.labels)} entries, at most {MAX_LABELS}")
    for k, v in o.labels.items():
        if not k or len(k) > MAX_LABEL_KEY:
            raise InvalidArgument(
                f"options: labels key {k!r} must be 1 to {MAX_LABEL_KEY} characters"
            )
        if len(v) > MAX_LABEL_VALUE:
            raise InvalidArgument(
                f"options: labels[{k!r}] is {len(v)} characters, at most {MAX_LABEL_VALUE}"
            )
        _no_nul("options", f"labels[{k!r}]", k + v)
    if len(o.executor) > MAX_EXECUTOR_NAME:
        raise InvalidArgument(
            f"options: executor is {len(o.executor)} characters, at most {MAX_EXECUTOR_NAME}"
        )
    _no_nul("options", "executor", o.executor)
    if len(o.idempotency_key) > MAX_IDEMPOTENCY_KEY:
        raise InvalidArgument(
            f"options: idempotency_key is {len(o.idempotency_key)} characters, "
            f"at most {MAX_IDEMPOTENCY_KEY}"
        )


def _check_job(where: str, spec: JobSpec, limits: JobsConfig) -> int:
    """Check one job on its own; what it holds in memory (spec_cost)."""
    if not spec.argv or not spec.argv[0]:
        raise InvalidArgument(f"{where}: argv must not be empty")
    for k, arg in enumerate(spec.argv):
        _no_nul(where, f"argv[{k}]", arg)
    _check_env(where, spec.env)
    if spec.working_dir:
        _no_nul(where, "working_dir", spec.working_dir)
        if not os.path.isabs(spec.working_dir):
            raise InvalidArgument(
                f"{where}: working_dir {spec.working_dir!r} must be an absolute path"
            )
    size = argv_cost(spec)
    if size > limits.max_argv_bytes:
        raise ResourceExhausted(
            f"{where}: argv and env hold {size} bytes in memory (each item's bytes and about "
            f"{_str_cost('')} bytes of overhead), over jobs.max_argv_bytes "
            f"({limits.max_argv_bytes})"
        )
    if len(spec.stdin) > limits.max_stdin_bytes:
        raise ResourceExhausted(
            f"{where}: stdin is {len(spec.stdin)} bytes, over jobs.max_stdin_bytes "
            f"({limits.max_stdin_bytes})"
        )
    if spec.timeout is not None and not 0 < spec.timeout <= MAX_TIMEOUT:
        raise InvalidArgument(
            f"{where}: timeout must be more than 0s and at most 366 days, not {spec.timeout}s"
        )
    _check_limits(where, spec)
    for dep in spec.depends_on:
        if dep == spec.name:
            raise InvalidArgument(f"{where}: depends_on names the job itself (a cycle)")
    if len(set(spec.depends_on)) != len(spec.depends_on):
        raise InvalidArgument(f"{where}: depends_on names a job twice")
    return spec_cost(spec)


# A stored string is a Python object, not its bytes: a str's header (sys.getsizeof) rounded
# up to pymalloc's 16-byte blocks, and the pointer to it in a tuple; a dict entry (hash, key,
# value, its index share, room to grow) on top for env. Measured on CPython 3.11.
_SLOT = 8
_DICT_ENTRY = 48


def _str_cost(s: str) -> int:
    return -(-sys.getsizeof(s) // 16) * 16 + _SLOT


def argv_cost(spec: JobSpec) -> int:
    """What a job's argv and env hold in the server's memory: what max_argv_bytes bounds."""
    argv = sum(_str_cost(a) for a in spec.argv)
    env = sum(_str_cost(k) + _str_cost(v) + _DICT_ENTRY for k, v in spec.env.items())
    return argv + env


def spec_cost(spec: JobSpec) -> int:
    """What a job holds in memory until its batch is stored (stdin then goes to disk):
    argv, env, stdin and depends_on, as max_batch_bytes counts them."""
    return argv_cost(spec) + len(spec.stdin) + sum(_str_cost(d) for d in spec.depends_on)


def _check_env(where: str, env: Mapping[str, str]) -> None:
    for k, v in env.items():
        if not k:
            raise InvalidArgument(f"{where}: env has an empty variable name")
        if "=" in k:
            raise InvalidArgument(f"{where}: env name {k!r} must not contain '='")
        _no_nul(where, f"env[{k!r}]", k + v)


def _check_limits(where: str, spec: JobSpec) -> None:
    lim = spec.limits
    if not lim.cpu_millis and not lim.memory_bytes:
        return
    cores = _cores()
    if lim.cpu_millis > cores * 1000:
        raise InvalidArgument(
            f"{where}: limits.cpu_millis {lim.cpu_millis} is more than this host's "
            f"{cores} cores ({cores * 1000})"
        )
    if 0 < lim.memory_bytes < MIN_MEMORY:
        raise InvalidArgument(
            f"{where}: limits.memory_bytes {lim.memory_bytes} is below the minimum "
            f"({MIN_MEMORY} bytes, 1 MiB)"
        )


def _check_acyclic(specs: list[JobSpec], names: Mapping[str, int]) -> None:
    """INVALID_ARGUMENT naming a job on a dependency cycle, if there is one."""
    indegree = [len(s.depends_on) for s in specs]
    dependents: dict[int, list[int]] = {}
    for i, s in enumerate(specs):
        for dep in s.depends_on:
            dependents.setdefault(names[dep], []).append(i)
    ready = [i for i, d in enumerate(indegree) if d == 0]
    done = 0
    while ready:
        i = ready.pop()
        done += 1
        for d in dependents.get(i, ()):
            indegree[d] -= 1
            if indegree[d] == 0:
                ready.append(d)
    if done < len(specs):
        i = next(k for k, d in enumerate(indegree) if d)
        raise InvalidArgument(f"{_job(i, specs[i].name)}: depends_on forms a dependency cycle")
