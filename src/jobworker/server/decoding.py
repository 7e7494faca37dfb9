"""Requests that do not decode: INVALID_ARGUMENT from the handler, not grpc's UNKNOWN."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio

from jobworker.errors import InvalidArgument
from jobworker.server import audit
from jobworker.server.errors import MESSAGE_LIMIT
from jobworker.server.identity import OpenCall
from jobworker.units import shorten


@dataclass(frozen=True, slots=True)
class Undecodable:
    """What a request that does not decode is handed on as: the handler answers it."""

    message: str


def decoding(deserialize: Callable[[bytes], Any] | None, name: str) -> Callable[[bytes], Any]:
    """`deserialize`, returning an Undecodable instead of raising (grpc would log a stack)."""

    def decode(data: bytes) -> Any:
        if deserialize is None:
            return data
        try:
            return deserialize(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, or a parser's own complaint
            return Undecodable(f"the {name} request does not decode: {exc}")

    return decode


def decoded(request: Any) -> Any:
    """`request`, or INVALID_ARGUMENT when it did not decode."""
    if isinstance(request, Undecodable):
        raise InvalidArgument(request.message)
    return request


class Requests:
    """A client stream's requests, decoded; marks the call done receiving at its end.

    A class, not an async generator: one left unfinished would be closed later, outside
    the call."""

    def __init__(self, requests: AsyncIterator[Any], call: OpenCall) -> None:
        self._requests, self._call = requests, call

    def __aiter__(self) -> Requests:
        return self

    async def __anext__(self) -> Any:
        try:
            return decoded(await anext(self._requests))
        except StopAsyncIteration:
            self._call.receiving = False  # storing the batch from now on: never cut short
            raise


async def _refuse(
    context: aio.ServicerContext[Any, Any], method: str, request: Undecodable
) -> None:
    audit.record_undecodable(method, request.message)
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


def checked(handler: grpc.RpcMethodHandler[Any, Any], method: str) -> Any:
    """`handler` of another service (health, reflection), answering a request that does not
    decode INVALID_ARGUMENT."""
    decode = decoding(handler.request_deserializer, method)
    serialize = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _checked_unary(handler.unary_unary, method), decode, serialize
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _checked_unary_stream(handler.unary_stream, method), decode, serialize
        )
    behavior = _checked_streams(handler.stream_unary or handler.stream_stream, method)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(behavior, decode, serialize)
    return grpc.stream_stream_rpc_method_handler(behavior, decode, serialize)


def _checked_unary(unary: Any, method: str) -> Any:
    async def unary_unary(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, Undecodable):
            await _refuse(context, method, request)
        return await unary(request, context)

    return unary_unary


def _checked_unary_stream(stream: Any, method: str) -> Any:
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

    return unary_stream


def _checked_streams(many: Any, method: str) -> Any:
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
    return stream_items if inspect.isasyncgenfunction(many) else streams
