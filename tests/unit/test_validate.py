"""BatchBuilder: each message checked on arrival, the cross-job rules at the end."""

from __future__ import annotations

import pytest

from jobworker.config import JobsConfig
from jobworker.errors import InvalidArgument, ResourceExhausted
from jobworker.model import BatchOptions, JobSpec, Limits
from jobworker.validate import BatchBuilder


def _builder(**limits: int) -> BatchBuilder:
    return BatchBuilder(JobsConfig(**limits))


def _job(name: str = "", *deps: str, **fields: object) -> JobSpec:
    return JobSpec(name, ("true",), depends_on=deps, **fields)  # type: ignore[arg-type]


def test_names_default_to_their_index_and_must_be_unique() -> None:
    b = _builder()
    assert b.add_job(_job()).name == "job-0"
    assert b.add_job(_job("x")).name == "x"
    with pytest.raises(InvalidArgument, match=r"job 2 \('job-0'\): name duplicates job 0"):
        b.add_job(_job("job-0"))


def test_options_come_first_and_once() -> None:
    b = _builder()
    b.add_options(BatchOptions())
    with pytest.raises(InvalidArgument, match="first message, and appear once"):
        b.add_options(BatchOptions())
    late = _builder()
    late.add_job(_job())
    with pytest.raises(InvalidArgument, match="first message"):
        late.add_options(BatchOptions())


def test_an_unknown_dependency_and_a_cycle_are_found_at_the_end() -> None:
    b = _builder()
    b.add_job(_job("a", "b"))
    b.add_job(_job("b", "a"))
    with pytest.raises(InvalidArgument, match="dependency cycle"):
        b.finish()
    unknown = _builder()
    unknown.add_job(_job("a", "nope"))
    with pytest.raises(InvalidArgument, match=r"job 0 \('a'\): depends_on names unknown job"):
        unknown.finish()


def test_a_long_chain_is_checked_without_recursion() -> None:
    b = _builder(max_jobs_per_batch=20_000)
    b.add_job(_job("j0"))
    for i in range(1, 10_000):
        b.add_job(_job(f"j{i}", f"j{i - 1}"))
    options, specs = b.finish()
    assert len(specs) == 10_000 and options == BatchOptions()


def test_an_empty_batch_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="batch has no job"):
        _builder().finish()


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        (JobSpec("a", ()), InvalidArgument, "argv must not be empty"),
        (JobSpec("a", ("a\0b",)), InvalidArgument, r"argv\[0\] contains a NUL"),
        (JobSpec("a", ("true",), working_dir="rel"), InvalidArgument, "absolute path"),
        (JobSpec("a", ("true",), env={"A=B": "1"}), InvalidArgument, "must not contain '='"),  # type: ignore[arg-type]
        (JobSpec("a", ("true",), timeout=0.0), InvalidArgument, "timeout must be more than 0s"),
        (JobSpec("a", ("true",), stdin=b"x" * 2048), ResourceExhausted, "jobs.max_stdin_bytes"),
        (
            JobSpec("a", ("true",), limits=Limits(memory_bytes=1000)),
            InvalidArgument,
            "below the minimum",
        ),
        (JobSpec("a", ("true",), depends_on=("a",)), InvalidArgument, "the job itself"),
    ],
)
def test_a_bad_job_names_itself_and_the_field(
    spec: JobSpec, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message) as info:
        _builder(max_stdin_bytes=1024).add_job(spec)
    assert str(info.value).startswith("job 0 ('a'): ")


def test_counts_and_bytes_are_capped() -> None:
    b = _builder(max_args=3, max_jobs_per_batch=2)
    with pytest.raises(ResourceExhausted, match=r"4 items, over jobs\.max_args \(3\)"):
        b.check_counts("", 2, 2, 0)
    with pytest.raises(InvalidArgument, match="depends_on names 2 jobs"):
        b.check_counts("", 1, 0, 2)
    b.add_job(_job())
    b.add_job(_job())
    with pytest.raises(ResourceExhausted, match=r"more than jobs\.max_jobs_per_batch"):
        b.add_job(_job())
    small = _builder(max_batch_bytes=200)
    small.add_job(_job())  # about 80 bytes in memory
    small.add_job(_job())
    with pytest.raises(ResourceExhausted, match=r"over jobs\.max_batch_bytes \(200\)"):
        small.add_job(_job())
