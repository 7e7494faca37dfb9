"""Batch files: the options and jobs of one batch in YAML or JSON."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

# pydantic, PyYAML and the models load on first use: every client command imports
# BatchFileError, and the models take a while to build.
if TYPE_CHECKING:
    import yaml
    from pydantic import ValidationError

    from jobworker.cli.batchmodel import Job
    from jobworker.v1 import jobworker_pb2 as pb


class BatchFileError(ValueError):
    """The batch file is invalid; the message names the job (index and name) and the field."""


def load_batch_file(
    path: str | Path, stdin: Callable[[], bytes] | None = None
) -> tuple[pb.BatchOptions | None, list[pb.JobSpec]]:
    """Read and parse a batch file; "-" reads standard input.

    The format comes from the extension (.json, .yaml, .yml) or, failing that, from
    the content: JSON when it starts with "{" or "[", YAML otherwise.
    """
    if str(path) == "-":
        read = stdin or sys.stdin.buffer.read
        raw = read()
        name, base_dir, suffix = "<stdin>", Path.cwd(), ""
    else:
        file = Path(path)
        try:
            raw = file.read_bytes()
        except OSError as err:
            raise BatchFileError(f"cannot read batch file {file}: {err.strerror}") from None
        name, base_dir, suffix = str(file), file.parent, file.suffix.lower()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BatchFileError(f"{name}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    return parse_batch(_decode(text, name, suffix), base_dir, source=name, text=text)


def _decode(text: str, name: str, suffix: str) -> object:
    import yaml

    is_json = suffix == ".json" or (
        suffix not in {".yaml", ".yml"} and text.lstrip()[:1] in {"{", "["}
    )
    if is_json:
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise BatchFileError(
                f"{name}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}"
            ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise BatchFileError(f"{name}: invalid YAML{where}: {problem}") from None


def parse_batch(
    data: object, base_dir: Path, source: str = "", text: str | None = None
) -> tuple[pb.BatchOptions | None, list[pb.JobSpec]]:
    """Options and jobs from decoded YAML/JSON; a bare list is a list of jobs.

    Errors name the job (index and name) and the field, and with the file's `text`
    also `source:line`; every error found is reported, one a line.
    """
    from pydantic import ValidationError

    from jobworker.cli.batchmodel import BatchFile

    if isinstance(data, list):
        data = {"jobs": data}
    if not isinstance(data, dict):
        prefix = f"{source}: " if source else ""
        raise BatchFileError(f"{prefix}must be a mapping with 'jobs' (and 'options')")
    try:
        batch = BatchFile.model_validate(data)
    except ValidationError as err:
        raise BatchFileError(_explain(err, data, source, text)) from None
    options = batch.options.to_pb() if batch.options is not None else None
    jobs = [_job_pb(index, job, base_dir) for index, job in enumerate(batch.jobs)]
    return options, jobs


def _job_pb(index: int, job: Job, base_dir: Path) -> pb.JobSpec:
    stdin = None
    if job.stdin_file is not None:
        path = base_dir / job.stdin_file
        try:
            stdin = path.read_bytes()
        except OSError as err:
            where = f"jobs[{index}] ({job.name}): " if job.name else f"jobs[{index}]: "
            raise BatchFileError(f"{where}stdin_file: cannot read {path}: {err.strerror}") from None
    return job.to_pb(stdin)


def _explain(err: ValidationError, data: dict[str, Any], source: str, text: str | None) -> str:
    from jobworker.cli.batchmodel import error_text

    lines = []
    for error in err.errors(include_url=False):
        loc = tuple(error["loc"])
        line = _line_of(text, loc) if text is not None else None
        where = f"{source}:{line}: " if line else (f"{source}: " if source else "")
        lines.append(where + error_text(error, data))
    return "\n".join(lines)


def _line_of(text: str, loc: tuple[int | str, ...]) -> int | None:
    """The line (from 1) of the value at `loc` in YAML or JSON `text`, or of its nearest
    parent that exists."""
    import yaml

    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    if node is None:
        return None
    if isinstance(node, yaml.SequenceNode) and loc[:1] == ("jobs",):
        loc = loc[1:]  # a bare list of jobs
    for key in loc:
        child = _child(node, key)
        if child is None:
            break
        node = child
    return node.start_mark.line + 1 if node is not None else None


def _child(node: yaml.Node, key: int | str) -> yaml.Node | None:
    import yaml

    if isinstance(node, yaml.MappingNode):
        for key_node, value in node.value:
            if key_node.value == str(key):
                return value  # type: ignore[no-any-return]
    if isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
        return node.value[key]  # type: ignore[no-any-return]
    return None


def batch_file_schema() -> dict[str, Any]:
    """The JSON Schema of batch files (as read after YAML or JSON decoding)."""
    from jobworker.cli.batchmodel import BatchFile

    schema = BatchFile.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
