"""Children for the signal tests, started with the signal dispositions the tests rely on.

A process inherits its parent's ignored signals and blocked-signal mask through fork and exec: started by `nohup`,
as a background job of a non-interactive shell, or by a job scheduler, the test suite and everything it spawns can
have SIGINT and SIGHUP ignored. Python keeps an inherited ignored SIGINT ignored (no KeyboardInterrupt), and
converters/atomic.py installs its SIGTERM/SIGHUP cleanup only over the default disposition (the Unix convention: an
inherited "ignore" is what `nohup` asks for). A test of how the tool handles a signal must therefore set the
dispositions it relies on in its child, whatever the suite inherited: `command` prefixes the child's argv with a
small Python prelude that sets SIGINT, SIGHUP, SIGTERM and SIGQUIT to their default (or to ignored, for the signals
named in `ignore`), unblocks every signal, and execs the real command. Dispositions set to default or ignored survive
exec; nothing else of the child changes.
"""

from __future__ import annotations

import signal
import subprocess
import sys

SET = (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGQUIT)

_PRELUDE = """\
import os, signal, sys
ignore = {int(s) for s in sys.argv[1].split(",") if s}
for s in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGQUIT):  # SET
    signal.signal(s, signal.SIG_IGN if s in ignore else signal.SIG_DFL)
signal.pthread_sigmask(signal.SIG_SETMASK, [])
os.execvp(sys.argv[2], sys.argv[2:])
"""


def command(argv: list[str], ignore: tuple[signal.Signals, ...] = ()) -> list[str]:
    """`argv` run with SET at their default disposition except `ignore` (ignored), and no signal blocked."""
    assert all(s in SET for s in ignore), ignore
    return [sys.executable, "-c", _PRELUDE, ",".join(str(int(s)) for s in ignore), *map(str, argv)]


def popen(argv: list[str], ignore: tuple[signal.Signals, ...] = (), **kwargs) -> subprocess.Popen:
    return subprocess.Popen(command(argv, ignore), **kwargs)


def proc_masks(status: str) -> dict[str, set[int]]:
    """The SigBlk / SigIgn / SigCgt sets of a /proc/PID/status text, as signal numbers."""
    out = {}
    for line in status.splitlines():
        name, _, value = line.partition(":")
        if name in ("SigBlk", "SigIgn", "SigCgt"):
            bits = int(value.strip(), 16)
            out[name] = {n for n in range(1, 65) if bits >> (n - 1) & 1}
    return out
