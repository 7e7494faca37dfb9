"""The `--json` shape of every client command, and its JSON Schema.

One shape for all commands, built from the dataclasses of jobworker.client.types:
keys in their fields' order, states as lowercase words, durations in seconds, times
in RFC 3339 (UTC), and log bytes as `data` text with an `encoding` beside it:
"utf-8" when the bytes are UTF-8, else "base64".
"""

from __future__ import annotations

import base64
import dataclasses
from datetime import datetime
from typing import Any

from jobworker.client import types as t

# The documents the commands print, by name (the schema's $defs carry the same names).
DOCUMENTS: dict[str, type] = {
    "Batch": t.Batch,
    "BatchList": t.BatchList,
    "BatchResults": t.BatchResults,
    "Submitted": t.Submitted,
    "Deleted": t.Deleted,
    "LogChunk": t.LogChunk,
    "StateChange": t.StateChange,
}
_WITH_DATA = ("LogTail", "LogChunk")


def to_json(value: Any) -> Any:
    """A dataclass (or a list or dict of them) as JSON-ready data in the documented shape."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for field in dataclasses.fields(value):
            item = getattr(value, field.name)
            if isinstance(item, bytes):
                out[field.name], out["encoding"] = encode_bytes(item)
            else:
                out[field.name] = to_json(item)
        return out
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, list | tuple):
        return [to_json(item) for item in value]
    if isinstance(value, dict):
        return {str(key): to_json(item) for key, item in value.items()}
    return value


def encode_bytes(data: bytes) -> tuple[str, str]:
    """(text, encoding): the bytes as UTF-8 text where they are, else base64."""
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(data).decode("ascii"), "base64"


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of every document the commands print."""
    from pydantic import TypeAdapter

    _, top = TypeAdapter.json_schemas(
        [(name, "serialization", TypeAdapter(kind)) for name, kind in DOCUMENTS.items()],
        ref_template="#/$defs/{model}",
    )
    defs: dict[str, Any] = top["$defs"]
    for schema in defs.values():
        _tighten(schema)
    for name in _WITH_DATA:
        props = defs[name]["properties"]
        props["data"] = {"type": "string", "description": "the bytes, as `encoding` says"}
        # `encoding` follows `data` in the output.
        keys = list(props)
        props["encoding"] = {"enum": ["utf-8", "base64"]}
        defs[name]["properties"] = {
            key: props[key] for key in [*keys[: keys.index("data") + 1], "encoding"]
        } | {key: props[key] for key in keys[keys.index("data") + 1 :]}
        defs[name]["required"] = list(defs[name]["properties"])
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "jobworker --json output",
        "description": __doc__,
        "oneOf": [{"$ref": f"#/$defs/{name}"} for name in DOCUMENTS],
        "$defs": defs,
    }


def _tighten(schema: dict[str, Any]) -> None:
    # Every key is always printed, and no other.
    schema["required"] = list(schema.get("properties", {}))
    schema["additionalProperties"] = False
    for prop in schema.get("properties", {}).values():
        prop.pop("default", None)
        prop.pop("title", None)
    schema.pop("description", None)
