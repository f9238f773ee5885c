"""Errors users can act on. The CLI prints `str(error)` on one line and exits with status 2."""
from __future__ import annotations


class ParityError(Exception):
    """Base class: bad input, a mismatch between a file and its config, an output that may not be written."""

    exit_code = 2


class CheckpointError(ParityError):
    """A checkpoint file is unreadable, incomplete, or departs from the spec."""


class ConfigError(ParityError):
    """A config cannot be determined, or does not match the shapes of a checkpoint."""


class InputsError(ParityError):
    """An inputs file (images, tokens, masks) is missing keys or has wrong shapes, dtypes or values."""


class OutputError(ParityError):
    """An output cannot be written (exists without --overwrite, unwritable directory)."""


def describe(file, key=None, expected=None, found=None, what: str = "") -> str:
    """One line naming the file, the key, what was expected and what was found."""
    parts = [str(file)]
    if key is not None:
        parts.append(f"key {key!r}")
    msg = ": ".join(parts)
    if what:
        msg += f": {what}"
    if expected is not None or found is not None:
        msg += f" (expected {expected}, found {found})"
    return msg
