"""Errors that name the file, what it should be, and what was found.

Every reader in the core raises these, so a user who points the system at a wrong or
incomplete dataset learns which file is at fault and why, instead of a bare KeyError.
"""
from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any


class MissingFileError(FileNotFoundError):
    """A file the system needs is absent."""

    def __init__(self, path: str | Path, what: str, hint: str = ""):
        self.path = Path(path)
        self.what = what
        message = f"missing {what}: expected it at {self.path}"
        super().__init__(message + (f" ({hint})" if hint else ""))


class FormatError(ValueError):
    """A file exists but its content is not what it should be (shape, dtype, TR, keys...)."""

    def __init__(self, path: str | Path, what: str, expected: str, found: str):
        self.path = Path(path)
        super().__init__(f"{self.path}: {what} should be {expected}, found {found}")


def read_format_json(path: str | Path, what: str, fmt: str, version: int, *, missing_hint: str = "",
                     expected_version: str | None = None, stale_hint: str = "") -> dict[str, Any]:
    """The JSON object in `path` whose "format" is `fmt` and "format_version" is `version` (a checkpoint's
    config.json, a bundle's manifest.json); MissingFileError / FormatError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(path, what, missing_hint)
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise FormatError(path, "content", "JSON", f"invalid JSON ({error})") from error
    if not isinstance(content, dict) or content.get("format") != fmt:
        found = content.get("format") if isinstance(content, dict) else type(content).__name__
        raise FormatError(path, "format", repr(fmt), repr(found))
    if content.get("format_version") != version:
        raise FormatError(path, "format_version", expected_version or str(version),
                          repr(content.get("format_version")) + stale_hint)
    return content


class ConfigValueError(ValueError):
    """A setting that cannot work as given (an unknown subject, a sampler that does not exist, an unsafe
    endpoint); the message says which setting and what to set instead."""


class OutDirInUse(ConfigValueError, FileExistsError):
    """A command's out_dir already holds another run; the message says how to continue it or go elsewhere."""


class ServiceUnavailable(RuntimeError):
    """A service this command talks to did not answer."""


class PortInUse(OSError):
    """A port a command would listen on is taken; the message names the setting that moves it."""

    def __init__(self, address: str, setting: str):
        super().__init__(errno.EADDRINUSE, f"{address} is already in use (another program, perhaps another mindeye "
                                           f"command, listens there): stop it or choose another port, e.g. {setting}")

    def __str__(self) -> str:  # the message alone, not OSError's "[Errno 98] ..."
        return self.strerror


def index_spans(indices: list[int]) -> str:
    """"4" or "4-9, 12" for ascending indices: volume numbers in one log line."""
    spans: list[list[int]] = []
    for index in indices:
        if spans and index == spans[-1][1] + 1:
            spans[-1][1] = index
        else:
            spans.append([index, index])
    return ", ".join(str(first) if first == last else f"{first}-{last}" for first, last in spans)
