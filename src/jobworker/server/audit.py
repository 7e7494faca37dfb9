"""The audit line: one `rpc` line a call, with its caller, batch, code and duration."""

from __future__ import annotations

import contextvars

import grpc
import structlog

from jobworker import logging as jwlogging

log = structlog.get_logger("jobworker.audit")

_cid: contextvars.ContextVar[str] = contextvars.ContextVar("correlation_id", default="")


def set_correlation_id(cid: str) -> None:
    """Record the batch an RPC concerns, for its audit line and the lines logged meanwhile."""
    _cid.set(cid)
    structlog.contextvars.bind_contextvars(correlation_id=cid)


def record(
    method: str,
    identity: str,
    seconds: float,
    code: grpc.StatusCode,
    peer: str,
    message: str = "",
) -> None:
    """Write the call's audit line now: it is out before the answer is."""
    log.info(
        "rpc",
        method=method,
        identity=identity,
        correlation_id=_cid.get(),
        code=code.name,
        duration_ms=round(seconds * 1000, 3),
        peer=peer,
        **({"error": message} if message else {}),
    )
    jwlogging.flush()


def record_undecodable(method: str, message: str) -> None:
    """The audit line of a request to another service (health, reflection) that did not decode."""
    log.info("rpc", method=method, code="INVALID_ARGUMENT", error=message)
    jwlogging.flush()
