"""The Python client of jobworker.

    from jobworker import Client
    with Client() as client:
        result = client.run(["uname", "-a"])
        print(result.exit_code, result.stdout.text)

`Client` and `AsyncClient` take and return the plain dataclasses of
`jobworker.client.types`; `RpcClient` and `AsyncRpcClient` speak protobuf.
"""

from jobworker.client.api import AsyncClient, Client
from jobworker.client.config import (
    DEFAULT_CA,
    DEFAULT_CERT,
    DEFAULT_KEY,
    DEFAULT_SERVER,
    ClientConfig,
    CredentialsError,
    load_context,
    profile_path,
    write_profile,
)
from jobworker.client.errors import ClientError, is_broken_stream
from jobworker.client.retry import Backoff
from jobworker.client.rpc import AsyncRpcClient, RpcClient
from jobworker.client.types import (
    Batch,
    BatchOptions,
    BatchSummary,
    JobResult,
    JobSpec,
    Limits,
    LogChunk,
    LogEvent,
    LogTail,
    RetryPolicy,
    StateChange,
    Submitted,
)

__all__ = [
    "DEFAULT_CA",
    "DEFAULT_CERT",
    "DEFAULT_KEY",
    "DEFAULT_SERVER",
    "AsyncClient",
    "AsyncRpcClient",
    "Backoff",
    "Batch",
    "BatchOptions",
    "BatchSummary",
    "Client",
    "ClientConfig",
    "ClientError",
    "CredentialsError",
    "JobResult",
    "JobSpec",
    "Limits",
    "LogChunk",
    "LogEvent",
    "LogTail",
    "RetryPolicy",
    "RpcClient",
    "StateChange",
    "Submitted",
    "is_broken_stream",
    "load_context",
    "profile_path",
    "write_profile",
]
