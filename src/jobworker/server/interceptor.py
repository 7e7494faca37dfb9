"""The interceptor: each call through identity, the handler, error mapping, audit, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from jobworker.server import audit, errors
from jobworker.server.decoding import Requests, checked, decoded, decoding
from jobworker.server.identity import Identities, OpenCall

SERVICE = "/jobworker.v1.JobWorkerService/"

Observer = Callable[[str, str, float], None]  # method, code name, seconds
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable["grpc.RpcMethodHandler[Any, Any]"]]


class Interceptor(aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps every JobWorkerService handler once; each concern lives in its own module."""

    def __init__(self, identities: Identities, observers: list[Observer] | None = None) -> None:
        self.identities = identities
        self.observers = observers or []

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(details)
        method: str = details.method
        if handler is None:
            return handler
        if not method.startswith(SERVICE):
            other: grpc.RpcMethodHandler[Any, Any] = checked(handler, method)
            return other  # health and reflection: any certificate of our CA may ask
        name = method.removeprefix(SERVICE)
        decode = decoding(handler.request_deserializer, name)
        serialize = handler.response_serializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(name, handler.unary_unary), decode, serialize
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(name, handler.stream_unary, streaming=True), decode, serialize
            )
        return grpc.unary_stream_rpc_method_handler(
            self._stream(name, handler.unary_stream),  # type: ignore[arg-type]  # stubs: sync only
            decode,
            serialize,
        )

    def _unary(
        self, name: str, behavior: Callable[..., Awaitable[Any]], *, streaming: bool = False
    ) -> Callable[..., Any]:
        async def wrapper(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            identity = "-"
            call: OpenCall | None = None
            try:
                peer = self.identities.peer(context)
                identity = peer.identity
                self.identities.caller(peer)
                if not streaming:
                    result = await behavior(decoded(request), context)
                else:
                    with self.identities.opened(name, peer) as call:
                        result = await behavior(Requests(request, call), context)
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
        # Responses go out with context.write from this coroutine, not by yielding: a client
        # that goes away cancels this task and every `finally` runs in it (ARCHITECTURE.md).
        async def wrapper(request: Any, context: aio.ServicerContext[Any, Any]) -> None:
            started = time.perf_counter()
            identity = "-"
            call: OpenCall | None = None
            try:
                peer = self.identities.peer(context)
                identity = peer.identity
                self.identities.caller(peer)
                with self.identities.opened(name, peer) as call:
                    items = behavior(decoded(request), context)
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
        code, message = errors.answer(exc, name, identity)
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
        audit.record(name, identity, seconds, code, context.peer(), message)
        for observe in self.observers:
            observe(name, code.name, seconds)
