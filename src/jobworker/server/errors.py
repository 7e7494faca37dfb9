"""Errors to status codes, in this one table; a server bug answers INTERNAL, logged once."""

from __future__ import annotations

import grpc
import structlog

from jobworker.errors import (
    FailedPrecondition,
    InvalidArgument,
    JobWorkerError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from jobworker.units import shorten

log = structlog.get_logger("jobworker.audit")

# Bytes of a status message: the audit line around it stays under 1 KiB, and a message
# past gRPC's header limit would reach the client as its own RESOURCE_EXHAUSTED.
MESSAGE_LIMIT = 900

_CODES: dict[type[JobWorkerError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The status code an exception is answered with."""
    for kind, code in _CODES.items():
        if isinstance(exc, kind):
            return code
    if isinstance(exc, NotImplementedError):  # the generated servicer's own, for an RPC
        return grpc.StatusCode.UNIMPLEMENTED  # of the .proto this server does not serve yet
    return grpc.StatusCode.INTERNAL


def answer(exc: Exception, method: str, identity: str) -> tuple[grpc.StatusCode, str]:
    """The code and message `exc` is answered with; a server bug is logged with its stack."""
    code = status_of(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("rpc_internal_error", method=method, identity=identity)
        return code, "internal error"
    return code, shorten(str(exc), MESSAGE_LIMIT)  # messages echo client input
