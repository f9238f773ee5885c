"""The `parity` command's group, its error handling and the progress displays every command shares.

Every command takes --json (a machine-readable report on stdout). Every error is one line on stderr and exit
status 2 (bad input, bad option, contradicting options); with --json it is also a JSON object on stdout,
{"error": {"kind", "message", "file", "key"}}. Ctrl-C prints one line and exits with status 130. Long work shows
progress on stderr when it is a terminal.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading

import click

from parity.errors import ParityError

INTERRUPTED = 130


def _emit(report: dict, as_json: bool, render) -> None:
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        render(report)


def _fail(kind: str, message: str, as_json: bool, file=None, key=None) -> None:
    message = " ".join(str(message).split())  # one line, whatever the message held
    click.echo(f"error: {message}", err=True)
    if as_json:
        click.echo(json.dumps({"error": {"kind": kind, "message": message, "file": file, "key": key}}))


def jax_compile_cache_default() -> str | None:
    """Give jax runs of the `parity` command a persistent XLA compilation cache (every compilation kept, however
    short), unless the user configured one: a tiny `golden check --impl jax` is then compiled once per machine
    instead of once per process. Set through jax's own environment variables before jax is imported (so the
    compare worker processes inherit it); `JAX_COMPILATION_CACHE_DIR=` (empty) turns it off. Returns the directory
    or None."""
    if "jax" in sys.modules or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return os.environ.get("JAX_COMPILATION_CACHE_DIR") or None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(base, "parity", "jax-compile")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    return path


class ParityGroup(click.Group):
    """Maps every failure to one line (and a JSON error object under --json) with a meaningful exit status:
    2 for bad input and bad options, 130 for Ctrl-C."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if args is None:  # the `parity` command itself (not an embedding program, not click's test runner)
            jax_compile_cache_default()
        argv = list(sys.argv[1:] if args is None else args)
        as_json = "--json" in argv
        try:
            rv = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else 0
        except click.UsageError as e:
            hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
            _fail("UsageError", e.format_message() + hint, as_json)
            code = 2
        except click.ClickException as e:
            _fail(type(e).__name__, e.format_message(), as_json)
            code = e.exit_code
        except ParityError as e:
            _fail(type(e).__name__, str(e), as_json, e.file, e.key)
            code = e.exit_code
        except (KeyboardInterrupt, click.exceptions.Abort):
            _fail("Interrupted", "interrupted (Ctrl-C); nothing was written", as_json)
            code = INTERRUPTED
        if not standalone_mode:
            return code
        sys.exit(code)

    def __call__(self, *args, **kwargs):
        """The console entry point. After Ctrl-C a worker may still sit in one long native operation; leave at
        once rather than wait for it (its outputs are temporary names, never the destination)."""
        try:
            return self.main(*args, **kwargs)
        except SystemExit as e:
            if e.code == INTERRUPTED and any(t.name == "parity-run" and t.is_alive() for t in threading.enumerate()):
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(INTERRUPTED)
            raise


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _show_progress() -> bool:
    return sys.stderr.isatty()


@contextlib.contextmanager
def progress_bar(enabled: bool, label: str, console=None):
    """A byte progress bar on stderr that fits the terminal (80 columns and up: the key is cut to fit), or nothing;
    yields a callback (done, total, key)."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Column

    with Progress(
        TextColumn(label),
        BarColumn(bar_width=20),
        DownloadColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[key]}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
        console=console or _console(),
        transient=True,
    ) as p:
        task = p.add_task(label, total=None, key="")

        def cb(done, total, key):
            p.update(task, completed=done, total=total, key=key)

        yield cb


_STAGES = {
    "loading": "loading checkpoint",
    "building": "building model",
    "hashing": "hashing files",
    "forward": "forward pass",
    "decoding": "decoding",
    "training": "training",
    "writing": "writing output",
}
_UNITS = {"forward": "blocks", "decoding": "tokens", "training": "steps"}


@contextlib.contextmanager
def stage_progress(enabled: bool, console=None):
    """Progress of a model run on stderr: loading (bytes), building, forward (blocks), decoding (tokens), writing;
    yields a parity.run.Progress callback, or None."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Column

    with Progress(
        TextColumn("{task.description}", table_column=Column(width=18)),
        BarColumn(bar_width=20),
        TextColumn("{task.fields[detail]}", table_column=Column(no_wrap=True, overflow="ellipsis")),
        TimeElapsedColumn(),
        console=console or _console(),
        transient=True,
    ) as p:
        task = p.add_task("preparing", total=None, detail="")

        def cb(stage, done, total):
            if stage == "loading" and total:
                detail = f"{done / 1e6:,.1f}/{total / 1e6:,.1f} MB"
            elif done is not None:
                detail = f"{done}/{total if total is not None else '?'} {_UNITS.get(stage, '')}".strip()
            else:
                detail = ""
            p.update(task, description=_STAGES.get(stage, stage), completed=done or 0, total=total, detail=detail)

        yield cb


CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 110}


class BackendChoice(click.Choice):
    """The names of the registered backends (parity.backend.names(): the built-in ones and the `parity.backends`
    entry points), read when click needs them (a --help, a check), not when this module is imported; listing them
    imports no backend."""

    def __init__(self):
        super().__init__([])

    @property
    def choices(self):
        from parity import backend

        return backend.names()

    @choices.setter
    def choices(self, value):
        pass


@click.group(cls=ParityGroup, context_settings=CONTEXT)
@click.version_option(package_name="paligemma-parity")
def main():
    """paligemma-parity: prove a PaliGemma checkpoint means the same in every framework, format and device."""


@contextlib.contextmanager
def _status(enabled: bool):
    """A rich status line on stderr naming what runs now, or nothing."""
    if not enabled:
        yield None
        return
    from rich.console import Console

    with Console(stderr=True).status("starting") as st:
        yield lambda msg: st.update(f"running {msg}")
