"""Errors that name the file, what it should be, and what was found.

Every reader in the core raises these, so a user who points the system at a wrong or
incomplete dataset learns which file is at fault and why, instead of a bare KeyError.
"""
from __future__ import annotations

import errno
from pathlib import Path


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
