"""Errors users can act on. The CLI prints `str(error)` on one line and exits with status 2.

A message built by `describe` remembers the file and key it names, so the CLI's `--json` error object can give them
as fields (`ParityError.file`, `.key`) without parsing the line.
"""

from __future__ import annotations


class ParityError(Exception):
    """Base class: bad input, a mismatch between a file and its config, an output that may not be written."""

    exit_code = 2

    def __init__(self, message="", *args, file=None, key=None):
        super().__init__(message, *args)
        self.file = file if file is not None else getattr(message, "file", None)
        self.key = key if key is not None else getattr(message, "key", None)


class CheckpointError(ParityError):
    """A checkpoint file is unreadable, incomplete, or departs from the spec."""


class ConfigError(ParityError):
    """A config cannot be determined, or does not match the shapes of a checkpoint."""


class InputsError(ParityError):
    """An inputs file (images, tokens, masks) is missing keys or has wrong shapes, dtypes or values."""


class OutputError(ParityError):
    """An output cannot be written (exists without --overwrite, unwritable directory)."""


class UsageError(ParityError):
    """A command-line option has a bad value or contradicts another option."""


class Diverged(ParityError):
    """A run produced a NaN or an infinity (a training step's loss or gradient): the numbers, not the input."""

    exit_code = 1


class Described(str):
    """A one-line message that also remembers the file and the key it names."""

    file: str | None = None
    key: str | None = None


def describe(file, key=None, expected=None, found=None, what: str = "") -> Described:
    """One line naming the file, the key, what was expected and what was found."""
    parts = [str(file)]
    if key is not None:
        parts.append(f"key {key!r}")
    msg = ": ".join(parts)
    if what:
        msg += f": {what}"
    if expected is not None or found is not None:
        msg += f" (expected {expected}, found {found})"
    out = Described(msg)
    out.file, out.key = str(file), (None if key is None else str(key))
    return out
