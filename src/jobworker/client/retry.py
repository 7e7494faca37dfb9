"""How `follow` retries a broken stream: delays that double, up to a time to give up."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc

from jobworker.client.errors import ClientError, is_broken_stream

# Told the last cursor received and the error, before each reconnect.
OnReconnect = Callable[[str, Exception], None]


@dataclass(frozen=True)
class Backoff:
    """How `follow` retries a broken stream: delays double up to `maximum`."""

    initial: float = 0.2
    maximum: float = 5.0
    # Give up once the failures in a row have lasted this long.
    give_up_after: float = 60.0


@dataclass
class Retry:
    """The state of one run of failures in a row."""

    backoff: Backoff
    clock: Callable[[], float]
    delay: float = 0.0
    failing_since: float | None = None

    def succeeded(self) -> None:
        self.delay = 0.0
        self.failing_since = None

    def next_delay(self, err: grpc.RpcError) -> float:
        """The delay before the next attempt, or raise the error when it is final."""
        if not is_broken_stream(err):
            raise ClientError.from_rpc_error(err) from None
        now = self.clock()
        if self.failing_since is None:
            self.failing_since = now
        elif now - self.failing_since >= self.backoff.give_up_after:
            error = ClientError.from_rpc_error(err)
            raise ClientError(
                error.code_name,
                f"{error.details} (gave up after {self.backoff.give_up_after:g}s of retries)",
            ) from None
        self.delay = (
            self.backoff.initial if self.delay == 0.0 else min(self.delay * 2, self.backoff.maximum)
        )
        return self.delay
