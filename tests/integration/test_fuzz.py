"""Fuzzing every RPC through a real server (issue 11): raw bytes and hostile protobufs.

Every answer must be a proper status (never UNKNOWN or INTERNAL, never the client
transport's own RESOURCE_EXHAUSTED for an oversized message), no traceback in the server's
log, the server alive and its memory flat once the fuzzed batches are gone.
JOBWORKER_FUZZ_EXAMPLES sets the cases per strategy (default 2000) for a long run."""

from __future__ import annotations

import collections
import os
import time
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as d
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobworker.v1 import jobworker_pb2 as pb

from .conftest import Server, ServerFactory, wait_until

EXAMPLES = int(os.environ.get("JOBWORKER_FUZZ_EXAMPLES", "2000"))
SERVICE = pb.DESCRIPTOR.services_by_name["JobWorkerService"]
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
PATH = "/jobworker.v1.JobWorkerService/"
MiB = 1 << 20

# Strings as a hostile client sends them: control characters, NULs, any plane, and long
# runs (a 100,000-character name is cheap to make as one character repeated).
_chars = st.characters(codec="utf-8")
TEXT = st.one_of(
    st.text(_chars, max_size=40),
    st.builds(lambda c, n: c * n, st.text(_chars, min_size=1, max_size=3), st.integers(0, 25_000)),
    st.sampled_from(["", ".", "..", "/", "a" * 64, "\x00", "admin\x00x", "-" * 8]),
)
_INTS: dict[int, tuple[int, int]] = {
    d.FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    d.FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    d.FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    d.FieldDescriptor.TYPE_ENUM: (-(2**31), 2**31 - 1),
    d.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    d.FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    d.FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    d.FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    d.FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    d.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    d.FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _int(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = [x for x in (lo, hi, 0, 1, -1, 1000, 86_401, 2**31) if lo <= x <= hi]
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi))


def _scalar(field: d.FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.type == d.FieldDescriptor.TYPE_STRING:
        return TEXT
    if field.type == d.FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=256)
    if field.type == d.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type in (d.FieldDescriptor.TYPE_DOUBLE, d.FieldDescriptor.TYPE_FLOAT):
        return st.floats(width=32 if field.type == d.FieldDescriptor.TYPE_FLOAT else 64)
    return _int(*_INTS[field.type])


def message(desc: d.Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Any message of type `desc`: each field set or not, with hostile values."""
    cls = pb.__dict__.get(desc.name) or _message_class(desc)
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in desc.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, value = (
                field.message_type.fields_by_name["key"],
                field.message_type.fields_by_name["value"],
            )
            fields[field.name] = st.dictionaries(_scalar(key), _scalar(value), max_size=4)
        elif field.message_type is not None:
            if depth > 1:
                continue
            inner = st.deferred(lambda f=field: message(f.message_type, depth + 1))
            many = field.is_repeated
            fields[field.name] = st.lists(inner, max_size=2) if many else inner
        elif field.is_repeated:
            fields[field.name] = st.lists(_scalar(field), max_size=4)
        else:
            fields[field.name] = _scalar(field)
    chosen = st.fixed_dictionaries({}, optional=fields)
    return chosen.map(lambda values: _build(cls, values))


def _message_class(desc: d.Descriptor) -> type[Message]:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(desc)


def _build(cls: type[Message], values: dict[str, Any]) -> Message:
    msg = cls()
    for name, value in values.items():
        field = getattr(msg, name)
        if isinstance(value, Message):
            field.CopyFrom(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                if isinstance(v, Message):
                    field[k].CopyFrom(v)
                else:
                    field[k] = v
        elif isinstance(value, list):
            if value and isinstance(value[0], Message):
                field.extend(value)
            else:
                field.extend(value)
        else:
            setattr(msg, name, value)
    return msg


def _safe_argv(msg: Message) -> Message:
    # Jobs that get scheduled must not run anything: the first argument names no program.
    if isinstance(msg, pb.ScheduleBatchRequest) and msg.HasField("job"):
        argv = list(msg.job.argv)
        del msg.job.argv[:]
        msg.job.argv.extend(["/nonexistent-fuzz/x", *argv[1:]])
        if msg.job.HasField("retry"):
            # A fuzzed policy (100 attempts a day apart) would keep its batch from ending
            # and retiring for the run's length: at most one retry, under a second away.
            # Negative (invalid) durations and the nanos stay fuzzed.
            retry = msg.job.retry
            retry.max_attempts = min(retry.max_attempts, 2)
            retry.initial_backoff.seconds = min(retry.initial_backoff.seconds, 0)
            retry.max_backoff.seconds = min(retry.max_backoff.seconds, 0)
    return msg


class Calls:
    """Sends requests as bytes to each RPC and counts the codes answered."""

    def __init__(self, server: Server) -> None:
        self.channel = server.channel("alice")
        self.codes: collections.Counter[str] = collections.Counter()
        self.bad: list[str] = []

    def send(self, method: d.MethodDescriptor, payloads: list[bytes]) -> None:
        path = PATH + method.name
        try:
            if method.client_streaming:
                self.channel.stream_unary(path)(iter(payloads), timeout=30)
            elif method.server_streaming:
                for _ in self.channel.unary_stream(path)(payloads[0], timeout=30):
                    pass
            else:
                self.channel.unary_unary(path)(payloads[0], timeout=30)
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
        self.codes[f"{method.name} {code.name}"] += 1
        if code in FORBIDDEN or len(details.encode()) > 1024 or "metadata size" in details:
            self.bad.append(f"{method.name}: {code.name} {details[:200]!r}")


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _fuzz(calls: Calls, examples: int) -> None:
    fuzz_settings = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    methods = st.sampled_from(list(SERVICE.methods))

    @fuzz_settings
    @given(methods, st.lists(st.binary(max_size=512), min_size=1, max_size=3))
    def raw(method: d.MethodDescriptor, payloads: list[bytes]) -> None:
        calls.send(method, payloads)

    @fuzz_settings
    @given(st.data())
    def structured(data: st.DataObject) -> None:
        method = data.draw(methods)
        many = data.draw(st.integers(1, 3)) if method.client_streaming else 1
        msgs = [_safe_argv(data.draw(message(method.input_type))) for _ in range(many)]
        calls.send(method, [m.SerializeToString() for m in msgs])

    raw()
    structured()


def _batches(server: Server) -> int:
    from jobworker.v1 import jobworker_pb2_grpc as pb_grpc

    stub = pb_grpc.JobWorkerServiceStub(server.channel("admin"))
    return len(stub.ListBatches(pb.ListBatchesRequest(page_size=1000), timeout=30).batches)


@pytest.mark.timeout(3600)
def test_fuzzed_requests_get_proper_statuses_and_memory_stays_flat(
    make_server: ServerFactory,
) -> None:
    server = make_server(
        retention={"max_age": "1s"}, jobs={"kill_grace": "1s", "max_concurrent": 4}
    )
    assert server.proc is not None
    calls = Calls(server)
    # Warm-up as long as the run (at most 4000): the allocator's arenas reach their high-water
    # mark with the largest messages; growth past it would be what the server keeps.
    _fuzz(calls, max(1000, min(EXAMPLES, 4000)))
    wait_until(lambda: _batches(server) == 0, 60, "the warm-up's batches retired")
    before = _rss(server.proc.pid)
    started = time.monotonic()
    _fuzz(calls, EXAMPLES)
    seconds = time.monotonic() - started
    wait_until(lambda: _batches(server) == 0, 120, "the fuzzed batches retired")
    after = _rss(server.proc.pid)
    total = sum(calls.codes.values())
    report = (
        f"{total} calls in {seconds:.0f}s; RSS {before / MiB:.1f} -> {after / MiB:.1f} MiB; "
        f"codes: {dict(sorted(calls.codes.items()))}"
    )
    print(report)
    assert not calls.bad, calls.bad[:10]
    assert server.proc.poll() is None, "the server died"
    tracebacks = [r for r in server.raw if "Traceback" in r or "rpc_internal_error" in r]
    assert not tracebacks, tracebacks[:3]
    assert after - before < 10 * MiB, report
