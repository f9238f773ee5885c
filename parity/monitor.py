"""Checkpoints between layers, shared by the implementations: cancellation and progress.

A long native operation (one bfloat16 matmul on a CPU without bf16 units can take a minute) never returns to the
Python interpreter, so Ctrl-C cannot stop it where it runs. `parity.run.interruptible` therefore runs the work in a
worker thread and keeps the main thread free to receive SIGINT; the main thread then sets `cancelled`, and the
worker stops at its next `tick` (implementations call it after every block and every decode step).

`tick(unit)` also counts progress: units are "block" (a ViT or LLM block finished) and "token" (a decode step).
A reporter installed with `reporting(...)` receives each count. Both are no-ops when nothing is installed, so the
implementations stay usable (and fast) from plain Python.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

cancelled = threading.Event()
_reporter: list[Callable[[str], None]] = []


class Cancelled(KeyboardInterrupt):
    """Raised in the worker at the first checkpoint after Ctrl-C."""


def tick(unit: str) -> None:
    """A checkpoint: raise Cancelled if the run was interrupted, else report one `unit` of progress."""
    if cancelled.is_set():
        raise Cancelled()
    if _reporter:
        _reporter[-1](unit)


def check() -> None:
    """A checkpoint that reports nothing (e.g. between tensors of an output being written)."""
    if cancelled.is_set():
        raise Cancelled()


@contextlib.contextmanager
def reporting(callback: Callable[[str], None] | None) -> Iterator[None]:
    """Send every `tick` unit to `callback` (e.g. a progress display) while inside."""
    if callback is None:
        yield
        return
    _reporter.append(callback)
    try:
        yield
    finally:
        _reporter.remove(callback)
