"""jobworker: run Linux processes on a host for remote clients, over gRPC with mutual TLS."""

import os

# grpcio's fork handlers crash a child spawned by a real fork(); jobworker never forks
# the slow way, and this must be set before grpc is first imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

__version__ = "0.1.0"
