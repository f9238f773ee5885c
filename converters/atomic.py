"""Outputs that appear whole or not at all, under interruption and concurrent writers.

`atomic_output(dst)` yields a temporary path beside `dst` and renames it over `dst` only when the body completes:

- The temporary is named `.{name}.{pid}.{token}.partial` and holds an exclusive flock for as long as its writer
  lives, so any later run can tell a live writer's temporary (locked: never touched) from one left by a process
  that was killed (SIGKILL cannot be caught): a stale temporary is named in the error of the next run to the same
  output, and `--overwrite` removes it.
- A second writer to the same output while one is running fails at once (exit 2), instead of both reporting
  success and one silently replacing the other; without `--overwrite` the final rename refuses to replace a
  destination that appeared meanwhile (renameat2 RENAME_NOREPLACE).
- With `--overwrite`, at every instant the destination name holds either the old complete output or the new one:
  a file is renamed over; a directory is exchanged with the new one (RENAME_EXCHANGE) and only then removed.
- SIGTERM and SIGHUP clean up like SIGINT (KeyboardInterrupt): while an output is open they raise `Terminated`;
  once every temporary is gone the signal is delivered again with its default action, so the process still ends
  the way its sender expects. A signal the process inherited as ignored (SIGHUP under `nohup`, SIGINT in a
  background job of a script) stays ignored, as Python keeps SIGINT: the conversion runs to its end
  (tests/test_interrupt.py::test_an_inherited_ignored_signal_stays_ignored).
- Everything under the temporary is flushed to disk (fsync) before the rename, and the directory after it, so a
  power loss never leaves the final name holding data that was not written.
- Temporaries get the permissions plain open()/mkdir() give (the umask is respected; not mkstemp's 0600).
- An OSError while writing (ENOSPC, EFBIG, EIO, EACCES) becomes one OutputError line naming the output.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import functools
import os
import re
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Iterator

from parity.errors import OutputError, describe

SUFFIX = ".partial"
CAUGHT_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100
_DIR_LOCK_SECONDS = 10.0


class Terminated(BaseException):
    """SIGTERM/SIGHUP received while an output was being written (a BaseException, like KeyboardInterrupt, so no
    `except Exception` on the way swallows it)."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum


# -- names --------------------------------------------------------------------------------------------------------
def temp_name(dst: str, tag: str = "") -> str:
    """A fresh temporary path beside `dst` carrying this process's pid."""
    d, base = os.path.split(dst)
    return os.path.join(d, f".{base}.{os.getpid()}.{secrets.token_hex(4)}{tag}{SUFFIX}")


def _temp_re(base: str) -> re.Pattern:
    b = re.escape(base)
    # ours (pid + token [+ .old]), and the mkstemp names of earlier versions (no pid)
    return re.compile(
        rf"^(?:\.{b}\.(?P<pid>\d+)\.[0-9a-f]{{8}}(?:\.old)?|\.{b}\.[a-z0-9_]{{8}}|{b}\.replaced)"
        rf"{re.escape(SUFFIX)}$"
    )


def temporaries(dst: str) -> list[tuple[str, int | None, bool]]:
    """(path, pid or None, live) for every temporary of `dst` in its directory."""
    d, base = os.path.split(os.path.abspath(dst))
    pat = _temp_re(base)
    try:
        names = os.listdir(d)
    except OSError:
        return []
    out = []
    for n in sorted(names):
        m = pat.match(n)
        if m:
            p = os.path.join(d, n)
            out.append((p, int(m["pid"]) if m["pid"] else None, _is_locked(p)))
    return out


def _is_locked(path: str) -> bool:
    """True when some process holds the writer's flock on `path` (its writer is alive)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False  # vanished, or a symlink: nobody's live temporary
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def remove_path(path: str) -> None:
    """Remove a file, symlink or directory tree (never following a symlink); missing is fine."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


# -- renames --------------------------------------------------------------------------------------------------------
@functools.cache
def _renameat2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        f = libc.renameat2
    except (OSError, AttributeError):
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    f.restype = ctypes.c_int
    return f


def _rename2(src: str, dst: str, flags: int) -> bool:
    """renameat2(src, dst, flags): True if done, False when the system cannot do it (then the caller falls back);
    OSError for a real failure (EEXIST for RENAME_NOREPLACE)."""
    f = _renameat2()
    if f is None:
        return False
    if f(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), dst)


def flush_to_disk(path: str) -> None:
    """fsync a finished temporary (every file and directory under it) before it is renamed into place.

    Without it a crash soon after the rename can leave the final name holding a file whose size is right but whose
    blocks were never written (ext4's delayed allocation reads them back as zeros): a safetensors file has no
    checksum, so that would be a checkpoint of silently wrong weights."""
    if os.path.isdir(path) and not os.path.islink(path):
        for root, _dirs, files in os.walk(path):
            for name in files:
                if os.path.isfile(os.path.join(root, name)) and not os.path.islink(os.path.join(root, name)):
                    _fsync_path(os.path.join(root, name))
            _fsync_path(root)
    elif os.path.isfile(path):
        _fsync_path(path)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    except OSError as e:  # a directory on a filesystem that cannot fsync one (EINVAL): nothing more to do
        if e.errno not in (errno.EINVAL, errno.EROFS):
            raise
    finally:
        os.close(fd)


def _commit(tmp: str, dst: str, overwrite: bool) -> None:
    if not os.path.lexists(dst) or not overwrite:
        try:
            if not _rename2(tmp, dst, _RENAME_NOREPLACE):
                if os.path.lexists(dst):  # fallback without renameat2 (a small window remains)
                    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
                os.rename(tmp, dst)
            return
        except FileExistsError:
            if not overwrite:
                raise
    if not os.path.isdir(tmp) and not (os.path.isdir(dst) and not os.path.islink(dst)):
        os.rename(tmp, dst)  # a file over a file: atomic
        return
    if _rename2(tmp, dst, _RENAME_EXCHANGE):  # both names stay complete; the old output is now at `tmp`
        remove_path(tmp)
        return
    aside = temp_name(dst, ".old")
    os.rename(dst, aside)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(aside, dst)
        raise
    remove_path(aside)


# -- signals --------------------------------------------------------------------------------------------------------
_depth = 0
_saved: dict[int, object] = {}


def _raise_terminated(signum, frame):
    raise Terminated(signum)


@contextlib.contextmanager
def cleanup_on_signals() -> Iterator[None]:
    """While open (outermost scope, main thread), SIGTERM and SIGHUP raise `Terminated` so that every enclosing
    cleanup runs; on leaving the outermost scope by `Terminated`, the signal is delivered again with its default
    action. Handlers that are not the default are left alone."""
    global _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _depth == 0:
        for s in CAUGHT_SIGNALS:
            if signal.getsignal(s) is signal.SIG_DFL:
                _saved[s] = signal.signal(s, _raise_terminated)
    _depth += 1
    try:
        yield
    except Terminated as e:
        if _depth == 1:
            _restore()
            signal.signal(e.signum, signal.SIG_DFL)
            os.kill(os.getpid(), e.signum)  # default action: the process ends here, killed by that signal
            time.sleep(1)
        raise
    finally:
        _depth -= 1
        if _depth == 0:
            _restore()


def _restore() -> None:
    for s, h in list(_saved.items()):
        signal.signal(s, h)
        del _saved[s]


# -- the output ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _directory_lock(parent: str) -> Iterator[None]:
    """Serialise the creation of temporaries in `parent` (a short flock on the directory itself), so of two
    writers starting at once exactly one sees the other."""
    try:
        fd = os.open(parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        yield
        return
    try:
        deadline = time.monotonic() + _DIR_LOCK_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise OutputError(
                        describe(
                            parent, what=f"directory locked by another writer for {_DIR_LOCK_SECONDS:g} s; try again"
                        )
                    ) from None
                time.sleep(0.01)
            except OSError:
                break  # a filesystem without flock: go on unserialised
        yield
    finally:
        os.close(fd)


def _create(tmp: str, is_dir: bool) -> int:
    """Create the temporary (umask-respecting modes) and return a descriptor holding its flock."""
    if is_dir:
        os.mkdir(tmp, 0o777)
        fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    else:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pass  # no flock on this filesystem: the pid in the name still tells a human whose it is
    return fd


def _check_others(dst: str, overwrite: bool) -> None:
    for path, pid, live in temporaries(dst):
        who = f"pid {pid}" if pid is not None else "an earlier version"
        if live:
            raise OutputError(
                describe(
                    dst,
                    what=f"another writer ({who}) is writing this output now "
                    f"(temporary {os.path.basename(path)}); wait for it or choose "
                    f"another output",
                )
            )
        if not overwrite:
            raise OutputError(
                describe(
                    dst,
                    what=f"stale temporary {path} left by an interrupted run ({who}, no "
                    f"longer running); remove it or pass --overwrite",
                )
            )
        remove_path(path)


@contextlib.contextmanager
def atomic_output(dst: str, is_dir: bool, overwrite: bool) -> Iterator[str]:
    """Yield a temporary path beside `dst` (a fresh empty directory when `is_dir`, else an empty file); on
    success rename it to `dst`; on any failure or interruption remove it. See the module docstring."""
    dst = os.path.abspath(dst)
    if os.path.lexists(dst) and not overwrite:
        raise OutputError(describe(dst, what="output exists; pass --overwrite to replace it"))
    parent = os.path.dirname(dst)
    if not os.path.isdir(parent):
        raise OutputError(
            describe(dst, what=f"cannot write: output directory {parent} does not exist or is not a directory")
        )
    with cleanup_on_signals():
        tmp, fd = None, -1
        try:
            with _directory_lock(parent):
                _check_others(dst, overwrite)
                tmp = temp_name(dst)
                try:
                    fd = _create(tmp, is_dir)
                except OSError as e:
                    tmp = None
                    raise OutputError(describe(dst, what=f"cannot write in {parent} ({e.strerror or e})")) from None
            yield tmp
            flush_to_disk(tmp)
            try:
                _commit(tmp, dst, overwrite)
            except FileExistsError:
                raise OutputError(
                    describe(
                        dst,
                        what="output appeared while this one was written (another "
                        "writer?); not replaced; pass --overwrite to replace it",
                    )
                ) from None
            tmp = None
            _fsync_path(parent)  # the rename itself
        except OSError as e:
            raise OutputError(describe(dst, what=f"cannot write ({e.strerror or e})")) from None
        finally:
            if fd >= 0:
                os.close(fd)
            if tmp is not None:
                remove_path(tmp)


def write_file_atomic(dst: str, data: bytes, overwrite: bool) -> None:
    """Write `data` to `dst` through `atomic_output`, flushed to disk before the rename (small files)."""
    with atomic_output(dst, False, overwrite) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
