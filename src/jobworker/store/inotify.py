"""One inotify instance for the whole server: watched folders wake their Notifier, no polling."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from jobworker.store.notify import Notifier

log = structlog.get_logger("jobworker.inotify")

IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_CREATE = 0x00000100
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")
_MASK = IN_MODIFY | IN_CLOSE_WRITE | IN_CREATE

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


@dataclass(eq=False)
class _Watch:
    wd: int
    notifiers: dict[int, Notifier] = field(default_factory=dict)  # key -> notifier


class Inotify:
    """Watches folders; every change in one wakes the notifiers registered on it."""

    def __init__(self) -> None:
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd: int = fd
        self._by_path: dict[Path, _Watch] = {}
        self._by_wd: dict[int, _Watch] = {}
        self._next_key = 0
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(fd, self._on_readable)

    def watch(self, path: Path, notifier: Notifier) -> int:
        """Wake `notifier` on changes in `path` until unwatch(key); refcounted per folder."""
        w = self._by_path.get(path)
        if w is None:
            wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), _MASK)
            if wd < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"inotify_add_watch {path}: {os.strerror(err)}")
            w = self._by_wd.get(wd) or _Watch(wd)
            self._by_path[path] = w
            self._by_wd[wd] = w
        self._next_key += 1
        w.notifiers[self._next_key] = notifier
        return self._next_key

    def unwatch(self, path: Path, key: int) -> None:
        """Drop one registration; the folder's watch goes with the last one."""
        w = self._by_path.get(path)
        if w is None:
            return
        w.notifiers.pop(key, None)
        if not w.notifiers:
            del self._by_path[path]
            self._by_wd.pop(w.wd, None)
            _libc.inotify_rm_watch(self.fd, w.wd)

    def close(self) -> None:
        """Stop watching everything."""
        self._loop.remove_reader(self.fd)
        os.close(self.fd)
        self._by_path.clear()
        self._by_wd.clear()

    def _on_readable(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        woken: set[int] = set()
        offset = 0
        while offset + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            offset += _EVENT.size + length
            if mask & IN_Q_OVERFLOW:  # events were lost: wake everyone, they re-read
                for every in list(self._by_wd.values()):
                    for notifier in list(every.notifiers.values()):
                        notifier.notify()
                continue
            if wd in woken:
                continue
            woken.add(wd)
            w = self._by_wd.get(wd)
            if w is not None:
                for notifier in list(w.notifiers.values()):
                    notifier.notify()
                if mask & IN_IGNORED:  # the folder is gone
                    self._by_wd.pop(wd, None)
