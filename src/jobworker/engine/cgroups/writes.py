"""The values that put a job's limits on its groups: which control files, what to write.

Pure functions of the limits, the hierarchy's version and the block devices, kept apart
from the code that makes groups so that the arithmetic (CFS periods, io.max lines) can
be read and tested on its own.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from jobworker.engine.cgroups.files import read
from jobworker.model import Limits

_CFS_PERIOD_US = 100_000
_CFS_MIN_QUOTA_US = 1_000
_CFS_MAX_PERIOD_US = 1_000_000

# Block devices that never carry a job's files: their throttles would only add noise.
_SKIPPED_BLOCK_PREFIXES = ("loop", "ram")


def block_devices() -> tuple[str, ...]:
    """MAJ:MIN of every whole block device in /sys/block, loop and ram devices left out."""
    devices: list[str] = []
    with contextlib.suppress(OSError):
        for entry in sorted(Path("/sys/block").iterdir()):
            if entry.name.startswith(_SKIPPED_BLOCK_PREFIXES):
                continue
            dev = read(entry / "dev").strip()
            if dev:
                devices.append(dev)
    return tuple(devices)


def cfs(cpu_millis: int) -> tuple[int, int]:
    """(quota_us, period_us) for `cpu_millis` thousandths of a core."""
    period = _CFS_PERIOD_US
    quota = cpu_millis * period // 1000
    if quota < _CFS_MIN_QUOTA_US:  # below the kernel's minimum quota: stretch the period
        period = min(_CFS_MAX_PERIOD_US, _CFS_MIN_QUOTA_US * 1000 // cpu_millis)
        quota = max(_CFS_MIN_QUOTA_US, cpu_millis * period // 1000)
    return quota, period


def wanted_limits(limits: Limits) -> set[str]:
    """The limits (cpu, memory, pids, io) `limits` asks for."""
    wanted: set[str] = set()
    if limits.cpu_millis:
        wanted.add("cpu")
    if limits.memory_bytes:
        wanted.add("memory")
    if limits.pids_max:
        wanted.add("pids")
    if limits.io_read_bytes_per_second or limits.io_write_bytes_per_second:
        wanted.add("io")
    return wanted


def only_limits(limits: Limits, names: set[str]) -> Limits:
    """`limits` with the fields of limits not in `names` zeroed."""
    io = "io" in names
    return Limits(
        cpu_millis=limits.cpu_millis if "cpu" in names else 0,
        memory_bytes=limits.memory_bytes if "memory" in names else 0,
        pids_max=limits.pids_max if "pids" in names else 0,
        io_read_bytes_per_second=limits.io_read_bytes_per_second if io else 0,
        io_write_bytes_per_second=limits.io_write_bytes_per_second if io else 0,
    )


def with_memory(limits: Limits, memory_bytes: int) -> Limits:
    """`limits` with memory_bytes replaced."""
    return Limits(
        cpu_millis=limits.cpu_millis,
        memory_bytes=memory_bytes,
        pids_max=limits.pids_max,
        io_read_bytes_per_second=limits.io_read_bytes_per_second,
        io_write_bytes_per_second=limits.io_write_bytes_per_second,
    )


_FIELDS = {
    "cpu": ("cpu_millis",),
    "memory": ("memory_bytes",),
    "pids": ("pids_max",),
    "io": ("io_read_bytes_per_second", "io_write_bytes_per_second"),
}


def field_names(names: tuple[str, ...]) -> tuple[str, ...]:
    """The Limits field names of limits `names` (io: both of its fields)."""
    return tuple(f for name in names for f in _FIELDS[name])


def limit_writes(
    name: str, v2: bool, limits: Limits, devices: tuple[str, ...]
) -> list[tuple[str, str]]:
    """(file, value) pairs that set limit `name`; a file starting with "?" may be missing."""
    if name == "cpu":
        quota, period = cfs(limits.cpu_millis)
        if v2:
            return [("cpu.max", f"{quota} {period}")]
        return [("cpu.cfs_period_us", str(period)), ("cpu.cfs_quota_us", str(quota))]
    if name == "memory":
        memory = str(limits.memory_bytes)
        if v2:  # no swap: past the limit is an OOM kill, not a slow crawl through swap
            return [("memory.max", memory), ("?memory.swap.max", "0")]
        return [
            ("memory.limit_in_bytes", memory),
            ("?memory.memsw.limit_in_bytes", memory),
            ("?memory.swappiness", "0"),
        ]
    if name == "pids":
        return [("pids.max", str(limits.pids_max))]
    return io_writes(v2, limits, devices)


def io_writes(v2: bool, limits: Limits, devices: tuple[str, ...]) -> list[tuple[str, str]]:
    """io.max lines (v2) or blkio throttle lines (v1), one per block device."""
    read, write = limits.io_read_bytes_per_second, limits.io_write_bytes_per_second
    if v2:
        parts = (f"rbps={read}" if read else "", f"wbps={write}" if write else "")
        value = " ".join(p for p in parts if p)
        return [("io.max", f"{dev} {value}") for dev in devices]
    writes: list[tuple[str, str]] = []
    for dev in devices:
        if read:
            writes.append(("blkio.throttle.read_bps_device", f"{dev} {read}"))
        if write:
            writes.append(("blkio.throttle.write_bps_device", f"{dev} {write}"))
    return writes
