"""The protocol's Outbox: one write per loop turn, bound to one connection at a time."""

from __future__ import annotations

import asyncio
from typing import Any

from jobworker.supervisor.protocol import Outbox, decode


class _Writer:
    """Stands in for an asyncio.StreamWriter: records each write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closing


def _ops(writer: _Writer) -> list[list[Any]]:
    return [[decode(line)["op"] for line in w.splitlines()] for w in writer.writes]


async def test_one_turns_messages_go_in_one_write_and_never_to_the_next_connection() -> None:
    outbox, old, new = Outbox(), _Writer(), _Writer()
    outbox.use(old)  # type: ignore[arg-type]
    outbox.send({"op": "started"})
    outbox.send({"op": "ended"})
    assert old.writes == []  # not before the turn ends
    await asyncio.sleep(0)
    assert _ops(old) == [["started", "ended"]]
    outbox.send({"op": "stop"})  # its flush is due on `old`...
    outbox.use(new)  # type: ignore[arg-type]
    outbox.send({"op": "hello"})
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert _ops(old) == [["started", "ended"], ["stop"]]  # written to `old` at the switch
    assert _ops(new) == [["hello"]]
    new.closing = True
    outbox.send({"op": "ack"})  # a closing connection takes nothing
    await asyncio.sleep(0)
    assert _ops(new) == [["hello"]]
