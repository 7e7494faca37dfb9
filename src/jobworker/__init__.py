"""jobworker: run Linux processes on a host for remote clients, over gRPC with mutual TLS.

`from jobworker import Client, AsyncClient` gives the Python client (jobworker.client).
"""

import os
from typing import TYPE_CHECKING, Any

# grpcio's fork handlers crash a child spawned by a real fork(); jobworker never forks
# the slow way, and this must be set before grpc is first imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

__version__ = "0.1.0"

if TYPE_CHECKING:
    from jobworker.client import AsyncClient, Client, ClientConfig, ClientError

__all__ = ["AsyncClient", "Client", "ClientConfig", "ClientError", "__version__"]
_CLIENT_NAMES = frozenset({"AsyncClient", "Client", "ClientConfig", "ClientError"})


def __getattr__(name: str) -> Any:
    # Imported on first use, so that the CLI and the server start without grpc's client.
    if name in _CLIENT_NAMES:
        import jobworker.client

        return getattr(jobworker.client, name)
    raise AttributeError(f"module 'jobworker' has no attribute {name!r}")
