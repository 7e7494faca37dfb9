"""The one interceptor: identity from the client certificate, role, errors, audit, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import structlog
from grpc import aio

from jobworker import logging as jwlogging
from jobworker.errors import (
    InvalidArgument,
    JobWorkerError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from jobworker.model import Caller

log = structlog.get_logger("jobworker.audit")

_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar("caller")

SERVICE = "/jobworker.v1.JobWorkerService/"

# Errors the project raises on purpose, mapped to status codes in this one place.
_CODES: dict[type[JobWorkerError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotFound: grpc.StatusCode.NOT_FOUND,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def current_caller() -> Caller:
    """The caller of the RPC being served (set by the interceptor)."""
    return _caller.get()


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The status code an exception is answered with."""
    for kind, code in _CODES.items():
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


RoleOf = Callable[[str], str]
Observer = Callable[[str, str, float], None]  # method, code name, seconds


class AuthInterceptor(aio.ServerInterceptor):  # type: ignore[type-arg]
    """Authenticates every call by its certificate, maps errors, writes the audit line."""

    def __init__(self, role_of: RoleOf, observers: list[Observer] | None = None) -> None:
        self.role_of = role_of  # reads the live config: roles change without a restart
        self.observers = observers or []

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or not method.startswith(SERVICE):
            return handler  # health and reflection: any certificate of our CA may ask
        name = method.removeprefix(SERVICE)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(name, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(name, handler.stream_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_stream_rpc_method_handler(
            self._stream(name, handler.unary_stream),  # type: ignore[arg-type]  # stubs: sync only
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    @staticmethod
    def _identity(context: aio.ServicerContext[Any, Any]) -> str:
        auth = context.auth_context()
        names = list(auth.get("x509_common_name") or [])
        if not names:
            raise PermissionDenied("client certificate has no common name")
        version = next(iter(auth.get("ssl_tls_version") or [b""]))
        if version and version not in (b"TLS1_3", b"TLSv1.3", b"TLS1_2", b"TLSv1.2"):
            raise PermissionDenied(f"TLS version {version.decode()} is not accepted")
        return str(names[0].decode())

    def _caller(self, identity: str) -> Caller:
        role = self.role_of(identity)
        if role == "none":
            raise PermissionDenied(f"identity {identity!r} has role 'none'")
        return Caller(identity, role)

    def _unary(self, name: str, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        async def wrapper(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            identity = "-"
            try:
                identity = self._identity(context)
                _caller.set(self._caller(identity))
                result = await behavior(request, context)
            except asyncio.CancelledError:
                self._done(name, identity, started, grpc.StatusCode.CANCELLED, context)
                raise
            except Exception as exc:
                await self._fail(context, name, identity, started, exc)
                raise  # unreachable: abort raises
            self._done(name, identity, started, grpc.StatusCode.OK, context)
            return result

        return wrapper

    def _stream(self, name: str, behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., Any]:
        # Responses go out with context.write from a coroutine, not by yielding: a client
        # that goes away then cancels this task, and every `finally` below runs in it.
        # (A dropped async generator is finalized later, outside the call; seen to crash.)
        async def wrapper(request: Any, context: aio.ServicerContext[Any, Any]) -> None:
            started = time.perf_counter()
            identity = "-"
            try:
                identity = self._identity(context)
                _caller.set(self._caller(identity))
                async with contextlib.aclosing(behavior(request, context)) as items:  # type: ignore[type-var]
                    async for item in items:
                        await context.write(item)
            except asyncio.CancelledError:
                self._done(name, identity, started, grpc.StatusCode.CANCELLED, context)
                raise
            except Exception as exc:
                await self._fail(context, name, identity, started, exc)
                raise
            self._done(name, identity, started, grpc.StatusCode.OK, context)

        return wrapper

    async def _fail(
        self,
        context: aio.ServicerContext[Any, Any],
        name: str,
        identity: str,
        started: float,
        exc: Exception,
    ) -> None:
        if isinstance(exc, aio.AbortError):  # already answered (a handler aborted)
            self._done(name, identity, started, context.code() or grpc.StatusCode.UNKNOWN, context)
            return
        code = status_of(exc)
        message = str(exc) if code is not grpc.StatusCode.INTERNAL else "internal error"
        if code is grpc.StatusCode.INTERNAL:
            log.exception("rpc_internal_error", method=name, identity=identity)
        self._done(name, identity, started, code, context, message=message)
        await context.abort(code, message)

    def _done(
        self,
        name: str,
        identity: str,
        started: float,
        code: grpc.StatusCode,
        context: aio.ServicerContext[Any, Any],
        message: str = "",
    ) -> None:
        seconds = time.perf_counter() - started
        cid = _cid.get()
        log.info(
            "rpc",
            method=name,
            identity=identity,
            correlation_id=cid,
            code=code.name,
            duration_ms=round(seconds * 1000, 3),
            peer=context.peer(),
            **({"error": message} if message else {}),
        )
        # Written now, with whatever the log sink holds (jobworker.logging._Sink): an
        # RPC's audit line is out before its answer is.
        jwlogging.flush()
        for observe in self.observers:
            observe(name, code.name, seconds)


_cid: contextvars.ContextVar[str] = contextvars.ContextVar("correlation_id", default="")


def set_correlation_id(cid: str) -> None:
    """Record the batch an RPC concerns, for its audit line."""
    _cid.set(cid)
    structlog.contextvars.bind_contextvars(correlation_id=cid)
