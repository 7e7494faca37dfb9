"""The one interceptor: decoding, identity and role, open calls, errors, audit, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from grpc import aio

from jobworker import logging as jwlogging
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
from jobworker.model import Caller
from jobworker.server.identity import Peer, Revocations, peer_of
from jobworker.units import shorten

log = structlog.get_logger("jobworker.audit")

_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar("caller")

SERVICE = "/jobworker.v1.JobWorkerService/"
MESSAGE_LIMIT = 900  # bytes of a status message: the audit line around it stays under 1 KiB

# Errors the project raises on purpose, mapped to status codes in this one place.
_CODES: dict[type[JobWorkerError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
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
    if isinstance(exc, NotImplementedError):  # the generated servicer's own, for an RPC
        return grpc.StatusCode.UNIMPLEMENTED  # of the .proto this server does not serve yet
    return grpc.StatusCode.INTERNAL


RoleOf = Callable[[str], str]
Observer = Callable[[str, str, float], None]  # method, code name, seconds


# -- requests that do not decode


@dataclass(frozen=True, slots=True)
class Undecodable:
    """What a request that does not decode is handed on as: the handler answers it."""

    message: str


def _decoding(deserialize: Callable[[bytes], Any] | None, name: str) -> Callable[[bytes], Any]:
    # grpc answers an exception raised by a deserializer UNKNOWN (INTERNAL in a stream),
    # with a traceback in the log; the handler answers this one INVALID_ARGUMENT instead.
    def decode(data: bytes) -> Any:
        if deserialize is None:
            return data
        try:
            return deserialize(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, or a parser's own complaint
            return Undecodable(f"the {name} request does not decode: {exc}")

    return decode


def _decoded(request: Any) -> Any:
    if isinstance(request, Undecodable):
        raise InvalidArgument(request.message)
    return request


class _Requests:
    """A client stream's requests, decoded; marks the call done receiving at its end.

    A class, not an async generator: one left unfinished would be closed later, outside
    the call."""

    def __init__(self, requests: AsyncIterator[Any], call: OpenCall) -> None:
        self._requests, self._call = requests, call

    def __aiter__(self) -> _Requests:
        return self

    async def __anext__(self) -> Any:
        try:
            return _decoded(await anext(self._requests))
        except StopAsyncIteration:
            self._call.receiving = False  # storing the batch from now on: never cut short
            raise


async def _refuse(
    context: aio.ServicerContext[Any, Any], method: str, request: Undecodable
) -> None:
    log.info("rpc", method=method, code="INVALID_ARGUMENT", error=request.message)
    jwlogging.flush()
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, shorten(request.message, MESSAGE_LIMIT))


class _CheckedRequests:
    """A client stream of another service's RPC (reflection): undecodable ends it."""

    def __init__(
        self, requests: AsyncIterator[Any], context: aio.ServicerContext[Any, Any], method: str
    ) -> None:
        self._requests, self._context, self._method = requests, context, method

    def __aiter__(self) -> _CheckedRequests:
        return self

    async def __anext__(self) -> Any:
        request = await anext(self._requests)
        if isinstance(request, Undecodable):
            await _refuse(self._context, self._method, request)
        return request


def _checked(handler: grpc.RpcMethodHandler[Any, Any], method: str) -> Any:
    """`handler` of another service (health, reflection), answering a request that does not
    decode INVALID_ARGUMENT instead of grpc's UNKNOWN and traceback."""
    decode = _decoding(handler.request_deserializer, method)
    serialize = handler.response_serializer
    if handler.unary_unary is not None:
        unary: Any = handler.unary_unary

        async def unary_unary(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            if isinstance(request, Undecodable):
                await _refuse(context, method, request)
            return await unary(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, decode, serialize)
    if handler.unary_stream is not None:
        stream: Any = handler.unary_stream

        async def unary_stream(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            if isinstance(request, Undecodable):
                await _refuse(context, method, request)
            result = stream(request, context)
            if inspect.isasyncgen(result):  # an async generator: its items written here
                async with contextlib.aclosing(result):
                    async for item in result:
                        await context.write(item)
                return None
            return await result  # it writes with context.write itself

        return grpc.unary_stream_rpc_method_handler(unary_stream, decode, serialize)
    many: Any = handler.stream_unary or handler.stream_stream

    async def streams(requests: AsyncIterator[Any], context: aio.ServicerContext[Any, Any]) -> Any:
        return await many(_CheckedRequests(requests, context, method), context)

    async def stream_items(
        requests: AsyncIterator[Any], context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        async with contextlib.aclosing(
            many(_CheckedRequests(requests, context, method), context)
        ) as items:
            async for item in items:
                yield item

    # grpc tells an async generator function from a coroutine function: keep which it was.
    behavior = stream_items if inspect.isasyncgenfunction(many) else streams
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(behavior, decode, serialize)
    return grpc.stream_stream_rpc_method_handler(behavior, decode, serialize)


# -- calls that stay open


@dataclass(slots=True, eq=False)
class OpenCall:
    """A streaming call in progress, which a reload or a revocation may end."""

    method: str
    peer: Peer
    task: asyncio.Task[Any]
    receiving: bool = True  # an upload that still reads; a follower always is
    ending: tuple[grpc.StatusCode, str] | None = None


class AuthInterceptor(aio.ServerInterceptor):  # type: ignore[type-arg]
    """Decodes, authenticates every call by its certificate, maps errors, writes the audit
    line; ends the open calls of an identity a reload refuses (recheck)."""

    def __init__(
        self,
        role_of: RoleOf,
        observers: list[Observer] | None = None,
        revocations: Revocations | None = None,
    ) -> None:
        self.role_of = role_of  # reads the live config: roles change without a restart
        self.observers = observers or []
        self.revocations = revocations
        self.open: set[OpenCall] = set()

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(details)
        method: str = details.method
        if handler is None:
            return handler
        if not method.startswith(SERVICE):
            checked: grpc.RpcMethodHandler[Any, Any] = _checked(handler, method)
            return checked  # health and reflection: any certificate of our CA may ask
        name = method.removeprefix(SERVICE)
        decode = _decoding(handler.request_deserializer, name)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(name, handler.unary_unary),
                request_deserializer=decode,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(name, handler.stream_unary, streaming=True),
                request_deserializer=decode,
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_stream_rpc_method_handler(
            self._stream(name, handler.unary_stream),  # type: ignore[arg-type]  # stubs: sync only
            request_deserializer=decode,
            response_serializer=handler.response_serializer,
        )

    # -- who calls

    def _peer(self, context: aio.ServicerContext[Any, Any]) -> Peer:
        peer = peer_of(context.auth_context())
        if self.revocations is not None:
            if self.revocations.refresh():  # a stat: `certs revoke` counts from the next call
                self.recheck()
            if self.revocations.revoked(peer.serial):
                raise Unauthenticated(
                    f"the client certificate of {shorten(repr(peer.identity), 100)} "
                    f"(serial {peer.serial:x}) is revoked"
                )
        return peer

    def _caller(self, identity: str) -> Caller:
        role = self.role_of(identity)
        if role == "none":
            raise PermissionDenied(f"identity {shorten(repr(identity), 100)} has role 'none'")
        return Caller(identity, role)

    def refusal(self, call: OpenCall) -> tuple[grpc.StatusCode, str] | None:
        """Why an open call may go on no longer (a reload took its role away, its
        certificate was revoked), or None."""
        who = shorten(repr(call.peer.identity), 100)
        if self.revocations is not None and self.revocations.revoked(call.peer.serial):
            return grpc.StatusCode.UNAUTHENTICATED, f"the client certificate of {who} is revoked"
        role = self.role_of(call.peer.identity)
        if role == "none":
            return grpc.StatusCode.PERMISSION_DENIED, f"identity {who} now has role 'none'"
        if call.method == "ScheduleBatch" and not Caller(call.peer.identity, role).can_schedule:
            return grpc.StatusCode.PERMISSION_DENIED, f"role {role!r} of {who} may not schedule"
        return None

    def recheck(self) -> int:
        """End the open calls that may go on no longer (after a reload); how many."""
        ended = 0
        for call in list(self.open):
            if call.ending is None and call.receiving and (why := self.refusal(call)):
                call.ending = why
                call.task.cancel()
                ended += 1
        return ended

    @contextlib.contextmanager
    def _opened(self, name: str, peer: Peer) -> Any:
        call = OpenCall(name, peer, asyncio.current_task())  # type: ignore[arg-type]
        self.open.add(call)
        try:
            yield call
        finally:
            self.open.discard(call)

    # -- the wrappers

    def _unary(
        self, name: str, behavior: Callable[..., Awaitable[Any]], *, streaming: bool = False
    ) -> Callable[..., Any]:
        async def wrapper(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            identity = "-"
            call: OpenCall | None = None
            try:
                peer = self._peer(context)
                identity = peer.identity
                _caller.set(self._caller(identity))
                if not streaming:
                    result = await behavior(_decoded(request), context)
                else:
                    with self._opened(name, peer) as call:
                        result = await behavior(_Requests(request, call), context)
            except asyncio.CancelledError:
                await self._cancelled(context, name, identity, started, call)
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
            call: OpenCall | None = None
            try:
                peer = self._peer(context)
                identity = peer.identity
                _caller.set(self._caller(identity))
                with self._opened(name, peer) as call:
                    items = behavior(_decoded(request), context)
                    async with contextlib.aclosing(items) as items:  # type: ignore[type-var]
                        async for item in items:
                            await context.write(item)
            except asyncio.CancelledError:
                await self._cancelled(context, name, identity, started, call)
                raise
            except Exception as exc:
                await self._fail(context, name, identity, started, exc)
                raise
            self._done(name, identity, started, grpc.StatusCode.OK, context)

        return wrapper

    async def _cancelled(
        self,
        context: aio.ServicerContext[Any, Any],
        name: str,
        identity: str,
        started: float,
        call: OpenCall | None,
    ) -> None:
        """A call cancelled by its client, or ended by recheck(): answered with why."""
        if call is None or call.ending is None:
            self._done(name, identity, started, grpc.StatusCode.CANCELLED, context)
            return
        call.task.uncancel()  # our own cancel: the call goes on to its answer
        code, message = call.ending
        self._done(name, identity, started, code, context, message=message)
        await context.abort(code, message)

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
        # Shortened: a message echoes client input, and past gRPC's header limit the client
        # would see its own transport's RESOURCE_EXHAUSTED instead.
        message = shorten(str(exc), MESSAGE_LIMIT) if code is not grpc.StatusCode.INTERNAL else ""
        if code is grpc.StatusCode.INTERNAL:
            message = "internal error"
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
