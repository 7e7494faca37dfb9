"""The supervisor's Daemon on a real ledger file that cannot be written."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from jobworker.engine.cgroups.backend import CgroupBackend
from jobworker.supervisor.daemon import Daemon


async def test_a_start_the_ledger_cannot_record_is_refused_and_never_made(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    daemon = Daemon(tmp_path, CgroupBackend("none"), listener)
    sent: list[dict[str, object]] = []
    daemon._send = sent.append  # type: ignore[method-assign]
    os.close(daemon.ledger._fd)
    daemon.ledger._fd = os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC
    try:
        marker = tmp_path / "ran"
        daemon._dispatch(
            {
                "op": "spawn",
                "key": "k1",
                "attempt": 1,
                "argv": ["touch", str(marker)],
                "job_dir": str(tmp_path),
            }
        )
        assert sent == [
            {
                "op": "failed",
                "key": "k1",
                "attempt": 1,
                "message": f"cannot record the job's start in {daemon.ledger.path}: "
                "No space left on device",
            }
        ]
        assert daemon.jobs == {} and not daemon._starting
        assert not marker.exists()
    finally:
        daemon.spawner.close()
        os.close(daemon.ledger._fd)
        listener.close()
