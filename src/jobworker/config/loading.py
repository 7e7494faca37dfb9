"""Loading the config file: TOML in, a validated frozen Config out."""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import ValidationError

from jobworker.config.messages import describe, key_lines, unknown_key
from jobworker.config.sections import SECTIONS, Config
from jobworker.errors import ConfigError


def load_config(path: Path | None) -> Config:
    """The config in the file at `path`; with None, the built-in defaults."""
    if path is None:
        return parse_config("", Path.cwd())
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"{path}: cannot read the config file: {reason}") from exc
    return parse_config(text, path.absolute().parent, source=path.absolute())


def parse_config(text: str, base_dir: Path, source: Path | None = None) -> Config:
    """The config in TOML `text`; relative paths are resolved against `base_dir`."""
    where = str(source) if source is not None else "config"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: invalid TOML: {exc}") from exc
    if "source" in data:  # a field of Config, but not a key of the file
        lines = key_lines(text)
        raise ConfigError(f"{where}: {unknown_key(('source',), lines)}")
    # Sections the file leaves out are validated too, so that their default paths are
    # resolved against base_dir rather than the current directory.
    complete = {name: {} for name in SECTIONS} | data
    context = {"base_dir": base_dir.absolute(), "from_file": True}
    try:
        config = Config.model_validate(complete, context=context)
    except ValidationError as exc:
        lines = key_lines(text)
        problems = sorted(describe(error, data, lines) for error in exc.errors())
        raise ConfigError(f"{where}: " + "; ".join(text for _, text in problems)) from None
    return config.model_copy(update={"source": source})
