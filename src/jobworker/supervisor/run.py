"""The job supervisor's process: its lock, socket and pid file, its loop's thread, its
signals, and its re-exec (supervisor/daemon.py holds what it does)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import signal
import socket
import sys
import threading
from pathlib import Path

import structlog

from jobworker import logging as jwlogging
from jobworker.engine.cgroups.backend import CgroupBackend
from jobworker.supervisor import protocol as p
from jobworker.supervisor.daemon import Daemon

log = structlog.get_logger()


def main(argv: list[str] | None = None) -> int:
    """`jobworker supervise --data-dir D --cgroup-root R`; see the module doc."""
    parser = argparse.ArgumentParser(prog="jobworker supervise")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--cgroup-root", default="jobworker")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-format", default="json")
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lock-fd", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--listen-fd", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    jwlogging.setup(args.log_level, args.log_format)
    data_dir = args.data_dir.absolute()
    lock = args.lock_fd if args.lock_fd >= 0 else _lock(data_dir)
    if lock < 0:
        return 0  # another supervisor serves this data_dir: the server connects to it
    listener = socket.socket(fileno=args.listen_fd) if args.listen_fd >= 0 else _listen(data_dir)
    _write_pid(data_dir)
    # The asyncio server closes its socket when it ends; a re-exec hands on this copy.
    listen_copy = os.dup(listener.fileno())
    backend = CgroupBackend.detect(args.cgroup_root)
    daemon = Daemon(data_dir, backend, listener)
    reexec = _run_loop(daemon, args.resume)
    if not reexec:
        os.close(listen_copy)
        for name in (p.PID_FILE, p.SOCKET):  # still under the lock: no successor's yet
            with contextlib.suppress(FileNotFoundError):
                os.unlink(data_dir / name)
        log.info("supervisor_stopped")
        jwlogging.flush()
        return 0
    jwlogging.flush()
    os.set_inheritable(lock, True)
    os.set_inheritable(listen_copy, True)
    args_out = [
        sys.executable, "-m", "jobworker.supervisor", "--data-dir", str(data_dir),
        "--cgroup-root", args.cgroup_root, "--log-level", args.log_level,
        "--log-format", args.log_format, "--resume",
        "--lock-fd", str(lock), "--listen-fd", str(listen_copy),
    ]  # fmt: skip
    os.execv(sys.executable, args_out)  # noqa: S606 - our own program, by absolute path


def _run_loop(daemon: Daemon, resume: bool) -> bool:
    """The loop on a thread of its own: the spawner forks jobs on the loop's thread from
    inside their v1 groups, and v1 charges the process's memory to its main thread's."""
    loop = asyncio.new_event_loop()
    result: list[bool] = []
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)  # this thread's loop
        try:
            result.append(loop.run_until_complete(daemon.run(resume)))
            # Left after a re-exec request: watchers of jobs the next program adopts.
            left = asyncio.all_tasks(loop)
            for task in left:
                task.cancel()
            if left:
                loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        except BaseException as exc:  # noqa: BLE001 - raised again on the main thread
            failure.append(exc)
        finally:
            loop.close()

    def deliver(sig: int, _frame: object) -> None:
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(daemon.on_signal, sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, deliver)
    thread = threading.Thread(target=run, name="jobworker-supervisor")
    thread.start()
    while thread.is_alive():
        thread.join(0.5)  # wakes for signals: CPython runs handlers on the main thread
    if failure:
        raise failure[0]
    return result[0]


def _lock(data_dir: Path) -> int:
    """flock data_dir/supervisor.lock; -1 when another supervisor holds it."""
    fd = os.open(data_dir / p.LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return -1
    return fd


def _listen(data_dir: Path) -> socket.socket:
    """The socket, made anew (under the lock: a file left there is a dead one's)."""
    path = data_dir / p.SOCKET
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(64)
    return sock


def _write_pid(data_dir: Path) -> None:
    path = data_dir / p.PID_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
