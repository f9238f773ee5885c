"""The `parity` command: thin click wrappers over library functions users can import.

Every command takes --json (a machine-readable report on stdout). Every error is one line on stderr and exit
status 2 (bad input, bad option, contradicting options); with --json it is also a JSON object on stdout,
{"error": {"kind", "message", "file", "key"}}. Ctrl-C prints one line and exits with status 130. Long work shows
progress on stderr when it is a terminal.

Modules: `base` (the group, errors, progress displays), `files` (convert, inspect, inputs, points), `runs`
(capture, generate), `compare` (compare, golden record / check), `train` (train-step), `assets` (the catalog of
released checkpoints). The entry point is `parity.cli:main`.
"""

from parity.cli import compare, files, runs, train  # noqa: F401  (each registers its commands on `main`)
from parity.cli.assets import assets
from parity.cli.base import jax_compile_cache_default, main, progress_bar, stage_progress

main.add_command(assets)

__all__ = ["main", "jax_compile_cache_default", "progress_bar", "stage_progress"]
