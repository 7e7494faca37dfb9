"""What a failed call means: the `ClientError` the clients raise, and whether a broken stream
may be retried."""

from __future__ import annotations

import grpc

# A broken stream worth resuming: the transport failed, not the request.
_RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})
# grpcio reports some connection losses mid-stream with these codes and words.
_BROKEN_TRANSPORT_CODES = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})
_BROKEN_TRANSPORT_WORDS = (
    "stream removed",
    "rst_stream",
    "connection reset",
    "socket closed",
    "broken pipe",
    "goaway",
)


class ClientError(Exception):
    """A request failed; `code_name` is the gRPC status code's name, e.g. "NOT_FOUND".

    `hint`, when set, says in plain words why the server could not be reached.
    """

    def __init__(self, code_name: str, details: str, hint: str = "") -> None:
        super().__init__(f"{code_name}: {details}")
        self.code_name = code_name
        self.details = details
        self.hint = hint

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> ClientError:
        """Wrap an error of grpc or grpc.aio."""
        code, details = code_and_details(err)
        return cls(code.name if code is not None else "UNKNOWN", details)

    @property
    def unreachable(self) -> bool:
        """True when the server could not be reached or the connection broke."""
        return self.code_name == "UNAVAILABLE"


def code_and_details(err: grpc.RpcError) -> tuple[grpc.StatusCode | None, str]:
    """The status code (None if there is none) and the details of an error of grpc or grpc.aio."""
    code = getattr(err, "code", None)
    details = getattr(err, "details", None)
    # Both grpc's _InactiveRpcError and grpc.aio's AioRpcError have these, synchronous.
    status = code() if callable(code) else None
    text = details() if callable(details) else None
    return (
        status if isinstance(status, grpc.StatusCode) else None,
        text if isinstance(text, str) else str(err),
    )


def is_broken_stream(err: grpc.RpcError) -> bool:
    """True when the error is the connection's, so the same request may be retried."""
    code, details = code_and_details(err)
    if code in _RETRYABLE_CODES:
        return True
    lowered = details.lower()
    return code in _BROKEN_TRANSPORT_CODES and any(w in lowered for w in _BROKEN_TRANSPORT_WORDS)
