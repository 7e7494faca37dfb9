"""The request messages of each call, built from the clients' arguments."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

from google.protobuf.duration_pb2 import Duration

from jobworker.v1 import jobworker_pb2 as pb


def duration(seconds: float) -> Duration:
    """`seconds` as a protobuf Duration, to the nanosecond."""
    duration = Duration()
    duration.FromNanoseconds(round(seconds * 1_000_000_000))
    return duration


def schedule_requests(
    jobs: Iterable[pb.JobSpec], options: pb.BatchOptions | None
) -> Iterator[pb.ScheduleBatchRequest]:
    if options is not None:
        yield pb.ScheduleBatchRequest(options=options)
    for job in jobs:
        yield pb.ScheduleBatchRequest(job=job)


def get_request(
    cid: str, job_names: Sequence[str], log_tail_bytes: int | None
) -> pb.GetBatchRequest:
    request = pb.GetBatchRequest(correlation_id=cid, job_names=job_names)
    if log_tail_bytes is not None:
        request.log_tail_bytes = log_tail_bytes
    return request


def cancel_request(
    cid: str, job_names: Sequence[str], grace: float | None
) -> pb.CancelBatchRequest:
    request = pb.CancelBatchRequest(correlation_id=cid, job_names=job_names)
    if grace is not None:
        request.grace_period.CopyFrom(duration(grace))
    return request


def list_request(
    page_size: int,
    page_token: str,
    labels: Mapping[str, str] | None,
    states: Sequence[pb.BatchState],
) -> pb.ListBatchesRequest:
    return pb.ListBatchesRequest(
        page_size=page_size, page_token=page_token, labels=labels or {}, states=states
    )


def stream_request(
    cid: str, job_names: Sequence[str], cursor: str, follow: bool, tail_lines: int | None = None
) -> pb.StreamBatchLogsRequest:
    request = pb.StreamBatchLogsRequest(
        correlation_id=cid, job_names=job_names, cursor=cursor, follow=follow, packed=True
    )
    # A tail counts from where the call starts; a resumed stream goes on from its cursor.
    if tail_lines is not None and not cursor:
        request.tail_lines = tail_lines
    return request


def unpacked(response: pb.StreamBatchLogsResponse) -> list[pb.StreamBatchLogsResponse]:
    """A (packed) StreamBatchLogs response as the responses it holds, one event each, in
    order, each with its own cursor: callers see no packing."""
    if not response.more:
        return [response]
    more = list(response.more)
    response.ClearField("more")
    return [response, *more]
