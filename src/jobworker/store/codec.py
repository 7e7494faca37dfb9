"""The batch codec: batch.json's record of a batch and the journal's lines of job events,
written and read back, every field read checked."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jobworker.model import (
    BatchOptions,
    JobEvent,
    JobSpec,
    JobState,
    Limits,
    RetryPolicy,
    Usage,
    frozen_map,
)
from jobworker.store.records import BatchRecord

FORMAT_VERSION = 1  # of batch.json: a server reads only its own


def _spec_to_json(spec: JobSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"name": spec.name, "argv": list(spec.argv)}
    if spec.env:
        out["env"] = dict(spec.env)
    if spec.working_dir:
        out["working_dir"] = spec.working_dir
    if spec.stdin:  # the bytes are in jobs/<i>/stdin; memory keeps only their size
        out["stdin_bytes"] = len(spec.stdin)
    if spec.timeout is not None:
        out["timeout"] = spec.timeout
    if spec.limits.any:
        out["limits"] = {k: getattr(spec.limits, k) for k in Limits.__slots__}
    if spec.depends_on:
        out["depends_on"] = list(spec.depends_on)
    if spec.retry is not None:
        r = spec.retry
        out["retry"] = {
            "max_attempts": r.max_attempts,
            "initial_backoff": r.initial_backoff,
            "max_backoff": r.max_backoff,
            "retry_on": sorted(s.name for s in r.retry_on),
        }
    return out


# Everything read back from disk is checked as if a stranger wrote it: a wrong type or an
# out-of-range number would otherwise fail later, far from the file (in the scheduler, or
# when a reply is encoded), and take the server down. Each check raises ValueError.

_INT32 = (1 << 31) - 1
_MAX_TIME = 1e11  # seconds since the epoch: far past any real time, inside a Timestamp
_MAX_SECONDS = 366 * 86400.0  # a timeout or a backoff
_MAX_ATTEMPTS = 100


def _int(value: object, lo: int = 0, hi: int = (1 << 63) - 1) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise ValueError(f"{value!r:.40} is not an integer from {lo} to {hi}")
    return value


def _num(value: object, lo: float = 0.0, hi: float = _MAX_TIME) -> float:
    if type(value) is not float and type(value) is not int:
        raise ValueError(f"{value!r:.40} is not a number")
    if not lo <= value <= hi:  # NaN fails too
        raise ValueError(f"{value!r:.40} is not from {lo} to {hi}")
    return value


def as_time(value: object) -> float:
    """A time read from disk (seconds since the epoch); ValueError when it is not one."""
    return _num(value)


def _str(value: object) -> str:
    if type(value) is not str:
        raise ValueError(f"{value!r:.40} is not a string")
    if not value.isascii():
        value.encode()  # a lone surrogate (JSON allows "\ud800") cannot go on the wire
    return value


def _obj(value: object) -> dict[str, Any]:
    if type(value) is not dict:
        raise ValueError(f"{value!r:.40} is not an object")
    return value


def _strings(value: object) -> list[str]:
    if type(value) is not list:
        raise ValueError(f"{value!r:.40} is not a list")
    return [_str(v) for v in value]


def _str_map(value: object) -> Mapping[str, str]:
    return frozen_map({_str(k): _str(v) for k, v in _obj(value).items()})


def _retry_from_json(value: object) -> RetryPolicy | None:
    if value is None:
        return None
    d = _obj(value)
    return RetryPolicy(
        max_attempts=_int(d["max_attempts"], 1, _MAX_ATTEMPTS),
        initial_backoff=_num(d["initial_backoff"], 0.0, _MAX_SECONDS),
        max_backoff=_num(d["max_backoff"], 0.0, _MAX_SECONDS),
        retry_on=frozenset(JobState[name] for name in _strings(d["retry_on"])),
    )


def _limits_from_json(value: object) -> Limits:
    d = _obj(value)
    unknown = set(d) - set(Limits.__slots__)
    if unknown:
        raise ValueError(f"unknown limits {sorted(unknown)!r:.80}")
    return Limits(**{k: _int(v) for k, v in d.items()})


def _spec_from_json(value: object) -> JobSpec:
    d = _obj(value)
    argv = tuple(_strings(d["argv"]))
    if not argv:
        raise ValueError("empty argv")
    timeout = d.get("timeout")
    return JobSpec(
        name=_str(d["name"]),
        argv=argv,
        env=_str_map(d.get("env", {})),
        working_dir=_str(d.get("working_dir", "")),
        timeout=None if timeout is None else _num(timeout, 0.0, _MAX_SECONDS),
        limits=_limits_from_json(d["limits"]) if "limits" in d else Limits(),
        depends_on=tuple(_strings(d.get("depends_on", []))),
        retry=_retry_from_json(d.get("retry")),
    )


def _check_graph(specs: tuple[JobSpec, ...]) -> None:
    """ValueError unless names are unique and dependencies name other jobs, without a cycle
    (the scheduler trusts both); a worklist, not recursion: a long chain is a valid batch."""
    names = {spec.name: i for i, spec in enumerate(specs)}
    if len(names) != len(specs):
        raise ValueError("two jobs have the same name")
    waiting = [0] * len(specs)
    dependents: dict[int, list[int]] = {}
    for i, spec in enumerate(specs):
        for dep in spec.depends_on:
            j = names.get(dep)
            if j is None or j == i:
                raise ValueError(f"job {i} depends on {dep!r:.80}, not another job")
            waiting[i] += 1
            dependents.setdefault(j, []).append(i)
    ready = [i for i, n in enumerate(waiting) if not n]
    done = 0
    while ready:
        j = ready.pop()
        done += 1
        for i in dependents.get(j, ()):
            waiting[i] -= 1
            if not waiting[i]:
                ready.append(i)
    if done != len(specs):
        raise ValueError("the jobs' dependencies make a cycle")


def _options_to_json(o: BatchOptions) -> dict[str, Any]:
    return {
        "labels": dict(o.labels),
        "max_parallel": o.max_parallel,
        "fail_fast": o.fail_fast,
        "idempotency_key": o.idempotency_key,
        "executor": o.executor,
    }


def _options_from_json(value: object) -> BatchOptions:
    d = _obj(value)
    fail_fast = d.get("fail_fast", False)
    if type(fail_fast) is not bool:
        raise ValueError(f"fail_fast {fail_fast!r:.40} is not a boolean")
    return BatchOptions(
        labels=_str_map(d.get("labels", {})),
        max_parallel=_int(d.get("max_parallel", 0), 0, _INT32),
        fail_fast=fail_fast,
        idempotency_key=_str(d.get("idempotency_key", "")),
        executor=_str(d.get("executor", "")),
    )


def meta_to_bytes(
    cid: str, owner: str, create_time: float, options: BatchOptions, specs: tuple[JobSpec, ...]
) -> bytes:
    """batch.json's text for a new batch."""
    meta = {
        "version": FORMAT_VERSION,
        "correlation_id": cid,
        "owner": owner,
        "create_time": create_time,
        "options": _options_to_json(options),
        "jobs": [_spec_to_json(s) for s in specs],
    }
    return json.dumps(meta, separators=(",", ":")).encode()


def parse_meta(raw: bytes) -> dict[str, Any]:
    """batch.json's object, its fields not checked yet; ValueError (or RecursionError)."""
    return _obj(json.loads(raw))


def record_from_meta(meta: dict[str, Any], path: Path) -> BatchRecord:
    """The batch whose folder is `path`, from batch.json's object (of FORMAT_VERSION),
    every field checked (no job event applied yet); ValueError, KeyError, TypeError,
    IndexError or RecursionError when one is wrong."""
    if meta["correlation_id"] != path.name:
        raise ValueError(f"it names batch {meta['correlation_id']!r:.60}")
    jobs = meta["jobs"]
    if type(jobs) is not list or not jobs:
        raise ValueError("jobs is not a list of jobs")
    specs = tuple(_spec_from_json(j) for j in jobs)
    _check_graph(specs)
    owner = _str(meta["owner"])
    if not owner:
        raise ValueError("no owner")
    return BatchRecord(
        cid=path.name,
        owner=owner,
        create_time=_num(meta["create_time"]),
        options=_options_from_json(meta["options"]),
        specs=specs,
        path=path,
        stdin_sizes=[_int(j.get("stdin_bytes", 0)) for j in jobs],
    )


def event_to_line(e: JobEvent) -> bytes:
    """One journal line: the event's fields that differ from their defaults."""
    d: dict[str, object] = {"q": e.seq, "i": e.index, "s": _STATE_NAMES[e.state], "t": e.time}
    if e.exit_code is not None:
        d["x"] = e.exit_code
    if e.signal:
        d["g"] = e.signal
    if e.message:
        d["m"] = e.message
    if e.pid:
        d["p"], d["ps"] = e.pid, e.pid_start
    if e.cgroup:
        d["c"] = e.cgroup
    if e.usage is not None:
        d["u"] = [e.usage.user_cpu, e.usage.system_cpu, e.usage.max_rss_bytes]
    if e.attempt != 1:
        d["a"] = e.attempt
    if e.retry_at:
        d["r"] = e.retry_at
    if e.offsets != (0, 0):
        d["o"] = list(e.offsets)
    if e.node:
        d["n"] = e.node
    return (json.dumps(d, separators=(",", ":")) + "\n").encode()


_STATE_NAMES = {s: s.name for s in JobState}


def event_from_line(line: bytes) -> JobEvent:
    """A journal line's event; ValueError (or KeyError, TypeError) when it is not one.

    Read for every event at every start: the checks of the fields every line has are
    written out, and the others checked only when present."""
    d = json.loads(line)
    if type(d) is not dict:
        raise ValueError("not an object")
    seq, index, when = d["q"], d["i"], d["t"]
    if type(seq) is not int or type(index) is not int or seq < 0 or index < 0:
        raise ValueError("q and i are not counts")
    if (type(when) is not float and type(when) is not int) or not 0 <= when <= _MAX_TIME:
        raise ValueError("t is not a time")
    state = _STATE_BY_NAME[d["s"]]
    if len(d) == 4:
        return JobEvent(seq, index, state, when)
    x, u, o = d.get("x"), d.get("u"), d.get("o")
    if u is not None and (type(u) is not list or len(u) != 3):
        raise ValueError("usage is not [user, system, rss]")
    if o is not None and (type(o) is not list or len(o) != 2):
        raise ValueError("offsets are not [stdout, stderr]")
    return JobEvent(
        seq=seq,
        index=index,
        state=state,
        time=when,
        exit_code=None if x is None else _int(x, -_INT32 - 1, _INT32),
        signal=_int(d["g"], 0, _INT32) if "g" in d else 0,
        message=_str(d["m"]) if "m" in d else "",
        pid=_int(d["p"], 0, _INT32) if "p" in d else 0,
        pid_start=_int(d["ps"]) if "ps" in d else 0,
        usage=Usage(_num(u[0], 0.0, 1e10), _num(u[1], 0.0, 1e10), _int(u[2])) if u else None,
        cgroup=_str(d["c"]) if "c" in d else "",
        node=_str(d["n"]) if "n" in d else "",
        attempt=_int(d["a"], 1, (1 << 32) - 1) if "a" in d else 1,
        retry_at=_num(d["r"]) if "r" in d else 0.0,
        offsets=(_int(o[0]), _int(o[1])) if o else (0, 0),
    )


_STATE_BY_NAME = {s.name: s for s in JobState}
