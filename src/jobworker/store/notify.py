"""A broadcast wake-up: waiters sleep until the next notify(), with no polling."""

from __future__ import annotations

import asyncio


class Notifier:
    """Wakes every task waiting on it at the next notify(); cheap when nobody waits."""

    __slots__ = ("_future",)

    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None

    def notify(self) -> None:
        """Wake every current waiter."""
        future, self._future = self._future, None
        if future is not None and not future.done():
            future.set_result(None)

    def waiter(self) -> asyncio.Future[None]:
        """A future that completes at the next notify(); take it BEFORE checking for work."""
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
        return self._future
