"""`jobworker serve`: the event loop on a thread of its own, signals handed over to it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import threading
from pathlib import Path

from jobworker import logging as jwlogging
from jobworker.config import load_config
from jobworker.server.app import App

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def serve(config_path: Path | None) -> None:
    """Run a server in the foreground until SIGTERM or SIGINT.

    The loop runs on "jobworker-loop" and the main thread only hands it signals, the shape
    of the job supervisor's (supervisor/run.py), which forks jobs on its loop's thread."""
    config = load_config(config_path)
    jwlogging.setup(config.logging.level, config.logging.format)
    app = App(config)
    loop = asyncio.new_event_loop()
    failure: list[BaseException] = []
    finished = threading.Event()
    # A signal's handler runs on the main thread once it wakes: it sleeps in select() on
    # this wake-up fd, not in a join() that nothing would interrupt.
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def run() -> None:
        try:
            with asyncio.Runner(loop_factory=lambda: loop) as runner:
                runner.run(app.run(signals=False))
        except BaseException as exc:  # noqa: BLE001 - raised again on the main thread
            failure.append(exc)
        finally:
            jwlogging.flush()  # lines held back: the loop that would write them is ending
            finished.set()
            with contextlib.suppress(BlockingIOError):  # full: the main thread wakes anyway
                os.write(wake_w, b"\0")

    def deliver(sig: int, _frame: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server has ended
            loop.call_soon_threadsafe(app.on_signal, sig)

    old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    for sig in SIGNALS:
        signal.signal(sig, deliver)
    thread = threading.Thread(target=run, name="jobworker-loop")
    try:
        thread.start()
        while not finished.is_set():
            select.select([wake_r], [], [])
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 512)  # handlers run as the main thread comes back here
        thread.join()
    finally:
        signal.set_wakeup_fd(old_wakeup)
        os.close(wake_r)
        os.close(wake_w)
    if failure:
        raise failure[0]
