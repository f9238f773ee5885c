"""sha256 of a checkpoint, computed once per file version.

A run records the sha256 of its checkpoint and `golden check` verifies it before loading: a full extra read of a
multi-GB file each time. The digest is kept in a small JSON cache keyed by the file's real path and trusted only
while the file's size, mtime (ns), inode and device are the ones it was computed for; anything else (a rewrite in
place, a replaced file, a corrupt or unreadable cache) means hashing again. A file modified less than
`RACY_SECONDS` before it was hashed is not cached: a second write within the same timestamp tick would go unseen.

A directory (safetensors shards, orbax) hashes as it always did: the sorted relative names and contents of all its
files in one sha256; its cache entry holds every file's (name, size, mtime, inode, device).

Cache file: $PARITY_SHA256_CACHE if set (empty or `off`: no cache), else $XDG_CACHE_HOME/parity/sha256.json, else
~/.cache/parity/sha256.json. Written atomically (a temporary beside it, renamed); the newest `MAX_ENTRIES` kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable

from converters.rawio import open_regular

CACHE_ENV = "PARITY_SHA256_CACHE"
MAX_ENTRIES = 256
RACY_SECONDS = 2.0
_BLOCK = 16 << 20
_VERSION = 1

Progress = Callable[[int, int], None]  # (bytes hashed, bytes total)


def cache_path() -> str | None:
    """Where the cache lives, or None when disabled."""
    env = os.environ.get(CACHE_ENV)
    if env is not None:
        return None if env in ("", "off") else env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "parity", "sha256.json")


def _files(path: str) -> list[str]:
    """The files hashed for `path`, in hashing order (today's definition: a file, or a directory's sorted walk)."""
    if os.path.isfile(path):
        return [path]
    return [os.path.join(d, f) for d, _, fs in sorted(os.walk(path)) for f in sorted(fs)]


def _version(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]


def _fingerprint(path: str, files: list[str]) -> list | None:
    """[[relative name, size, mtime_ns, inode, device], ...] now; None if a file cannot be stat'ed."""
    out = []
    for p in files:
        try:
            st = os.stat(p)
        except OSError:
            return None
        out.append([os.path.relpath(p, path) if p != path else "", *_version(st)])
    return out


def _load(cache: str) -> dict:
    try:
        with open(cache, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(d, dict) or d.get("version") != _VERSION or not isinstance(d.get("entries"), dict):
        return {}
    return d["entries"]


def _store(cache: str, key: str, entry: dict) -> None:
    """Add `entry` under `key` (re-reading the cache first: other processes may have added theirs); an unwritable
    cache is skipped silently, it only costs a re-hash."""
    entries = _load(cache)
    entries.pop(key, None)
    entries[key] = entry
    entries = dict(list(entries.items())[-MAX_ENTRIES:])
    d = os.path.dirname(os.path.abspath(cache))
    tmp = None
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".sha256.", suffix=".tmp", dir=d)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": _VERSION, "entries": entries}, f, indent=1, sort_keys=True)
        os.replace(tmp, cache)
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)


def _hash(path: str, files: list[str], progress: Progress | None) -> tuple[str, list]:
    """(sha256, fingerprint taken from each open descriptor before its bytes were read)."""
    h = hashlib.sha256()
    seen = []
    total = 0
    if progress is not None:
        fp = _fingerprint(path, files)
        total = sum(f[1] for f in fp) if fp else 0
    done = 0
    for p in files:
        rel = os.path.relpath(p, path) if p != path else ""
        if p != path:
            h.update(rel.encode() + b"\0")
        with os.fdopen(open_regular(p), "rb") as f:  # a FIFO beside the checkpoint must not block forever
            seen.append([rel, *_version(os.fstat(f.fileno()))])
            while chunk := f.read(_BLOCK):
                h.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
    return h.hexdigest(), seen


def file_sha256(path: str | os.PathLike, progress: Progress | None = None) -> str:
    """sha256 of a file, or of a directory's files (sorted relative names and contents), from the cache when the
    file version (size, mtime, inode, device) is the one it was computed for."""
    path = os.fspath(path)
    files = _files(path)
    cache = cache_path()
    key = os.path.realpath(path)
    if cache is not None and files:
        entry = _load(cache).get(key)
        if (
            isinstance(entry, dict)
            and isinstance(entry.get("sha256"), str)
            and entry.get("files") == _fingerprint(path, files)
        ):
            return entry["sha256"]
    started = time.time_ns()
    digest, seen = _hash(path, files, progress)
    stable = all(started - v[2] > RACY_SECONDS * 1e9 for v in seen)
    if cache is not None and seen and stable and seen == _fingerprint(path, files):
        _store(cache, key, {"sha256": digest, "files": seen})
    return digest
