"""The baselines of the follow and load figures: a plain grpc.aio server, as fast as gRPC
allows.

`python -m bench.baseline_server PKI_DIR [GETBATCH_FILE]` listens on a free loopback port
with the same mutual TLS as jobworker (require_client_auth, the same CA and server
certificate), prints `{"address": ...}` on stdout, and serves, as `bench.Baseline`:

- StreamFile: the request is a file path; the answer is the file in reads of jobworker's
  own CHUNK size (512 KiB), each wrapped as jobworker wraps its chunks (a
  StreamBatchLogsResponse holding a LogChunk and a cursor), so every message has the size
  and shape of jobworker's. No store, no inotify, no engine.
- GetBatch: parses a GetBatchRequest and answers with the GetBatchResponse in
  GETBATCH_FILE (one jobworker gave for a batch like those asked for), as it is.
- ScheduleBatch: parses every ScheduleBatchRequest of the stream and answers with a
  ScheduleBatchResponse holding a new correlation id. Nothing is stored or run.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from grpc import aio

from jobworker.store.follow import CHUNK  # jobworker's read size: the same message size
from jobworker.v1 import jobworker_pb2 as pb

METHOD = "/bench.Baseline/StreamFile"
# A cursor as long as jobworker's for a single running job (base64 of a short JSON list).
CURSOR = "WzEsImFiY2RlZjEyIiwxLFtbMCwyNjIxNDQsMF1dXQ=="


def _identity(data: bytes) -> bytes:
    return data


async def _stream_file(request: bytes, context: aio.ServicerContext) -> AsyncIterator[bytes]:
    path = request.decode()
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while True:
            data = os.pread(fd, CHUNK, offset)
            if not data:
                return
            offset += len(data)
            message = pb.StreamBatchLogsResponse(
                chunk=pb.LogChunk(job_index=0, job_name="writer", stream=1, data=data),
                cursor=CURSOR,
            )
            message.chunk.time.FromNanoseconds(time.time_ns())
            yield message.SerializeToString()
    finally:
        os.close(fd)


async def _schedule_batch(
    requests: AsyncIterator[pb.ScheduleBatchRequest], context: aio.ServicerContext
) -> pb.ScheduleBatchResponse:
    async for _ in requests:
        pass
    return pb.ScheduleBatchResponse(correlation_id=str(uuid.uuid4()))


async def serve(pki: Path, getbatch: bytes = b"") -> None:
    """Serve until stdin closes (the bench holds it open while it needs the server)."""

    async def get_batch(request: pb.GetBatchRequest, context: aio.ServicerContext) -> bytes:
        return getbatch

    server = aio.server()
    handler = grpc.method_handlers_generic_handler(
        "bench.Baseline",
        {
            "StreamFile": grpc.unary_stream_rpc_method_handler(
                _stream_file, request_deserializer=_identity, response_serializer=_identity
            ),
            "GetBatch": grpc.unary_unary_rpc_method_handler(
                get_batch,
                request_deserializer=pb.GetBatchRequest.FromString,
                response_serializer=_identity,
            ),
            "ScheduleBatch": grpc.stream_unary_rpc_method_handler(
                _schedule_batch,
                request_deserializer=pb.ScheduleBatchRequest.FromString,
                response_serializer=pb.ScheduleBatchResponse.SerializeToString,
            ),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    creds = grpc.ssl_server_credentials(
        [((pki / "server-key.pem").read_bytes(), (pki / "server.pem").read_bytes())],
        root_certificates=(pki / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    print(json.dumps({"address": f"127.0.0.1:{port}", "pid": os.getpid()}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # returns at EOF: the bench is done
    await server.stop(1)


if __name__ == "__main__":
    canned = Path(sys.argv[2]).read_bytes() if len(sys.argv) > 2 else b""
    asyncio.run(serve(Path(sys.argv[1]), canned))
