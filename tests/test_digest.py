"""converters.digest: a checkpoint's sha256 is read once per file version, and never trusted for another one."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from converters import digest
from parity.run import file_sha256 as run_file_sha256

OLD = 1_600_000_000_000_000_000  # an mtime (ns) well in the past: not "racy"


def by_hand(path) -> str:
    """The definition, written out independently: a file's bytes; a directory's sorted relative names + bytes."""
    h = hashlib.sha256()
    if os.path.isfile(path):
        h.update(open(path, "rb").read())
        return h.hexdigest()
    for d, _, fs in sorted(os.walk(path)):
        for f in sorted(fs):
            p = os.path.join(d, f)
            h.update(os.path.relpath(p, path).encode() + b"\0" + open(p, "rb").read())
    return h.hexdigest()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    c = tmp_path / "cache" / "sha256.json"
    monkeypatch.setenv(digest.CACHE_ENV, str(c))
    return c


@pytest.fixture
def reads(monkeypatch):
    """Paths opened for hashing, in order."""
    opened = []
    orig = digest.open_regular

    def counting(p, *a, **k):
        opened.append(os.fspath(p))
        return orig(p, *a, **k)

    monkeypatch.setattr(digest, "open_regular", counting)
    return opened


def old_file(path, data: bytes, mtime: int = OLD):
    path.write_bytes(data)
    os.utime(path, ns=(mtime, mtime))
    return path


def test_second_call_reads_nothing(tmp_path, cache, reads):
    f = old_file(tmp_path / "ck.npz", b"weights" * 1000)
    assert digest.file_sha256(f) == by_hand(f)
    assert reads == [str(f)]
    assert digest.file_sha256(f) == by_hand(f)
    assert run_file_sha256(str(f)) == by_hand(f)  # parity.run's delegates to the same cache
    assert reads == [str(f)]
    assert json.loads(cache.read_text())["entries"][os.path.realpath(f)]["sha256"] == by_hand(f)


def test_same_size_new_mtime_is_hashed_again(tmp_path, cache, reads):
    f = old_file(tmp_path / "ck.npz", b"a" * 4096)
    first = digest.file_sha256(f)
    old_file(f, b"b" * 4096, OLD + 1)  # rewritten in place: same size and inode, mtime one ns later
    assert digest.file_sha256(f) == by_hand(f) != first
    assert len(reads) == 2


def test_replaced_file_with_same_size_and_mtime_is_hashed_again(tmp_path, cache, reads):
    f = old_file(tmp_path / "ck.npz", b"a" * 4096)
    first = digest.file_sha256(f)
    new = old_file(tmp_path / "new.npz", b"b" * 4096)  # created while the old one exists: another inode
    os.replace(new, f)
    assert os.stat(f).st_mtime_ns == OLD and os.stat(f).st_size == 4096
    assert digest.file_sha256(f) == by_hand(f) != first
    assert len(reads) == 2


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"\xff\xfe", b"[]", b'{"version": 1, "entries": []}', b'{"version": 99, "entries": {}}'],
)
def test_corrupt_cache_is_ignored_and_rewritten(tmp_path, cache, reads, content):
    f = old_file(tmp_path / "ck.npz", b"x" * 100)
    cache.parent.mkdir()
    cache.write_bytes(content)
    assert digest.file_sha256(f) == by_hand(f)
    assert json.loads(cache.read_text())["entries"][os.path.realpath(f)]["sha256"] == by_hand(f)
    assert digest.file_sha256(f) == by_hand(f)
    assert len(reads) == 1


def test_a_lying_entry_for_another_version_is_not_trusted(tmp_path, cache, reads):
    f = old_file(tmp_path / "ck.npz", b"x" * 100)
    digest.file_sha256(f)
    d = json.loads(cache.read_text())
    d["entries"][os.path.realpath(f)]["sha256"] = "0" * 64
    d["entries"][os.path.realpath(f)]["files"][0][1] = 99  # recorded for a 99-byte version of the file
    cache.write_text(json.dumps(d))
    assert digest.file_sha256(f) == by_hand(f)
    assert len(reads) == 2


def test_recently_modified_file_is_not_cached(tmp_path, cache, reads):
    f = tmp_path / "ck.npz"
    f.write_bytes(b"fresh")  # mtime now: a same-size rewrite within the timestamp tick would go unseen
    assert digest.file_sha256(f) == digest.file_sha256(f) == by_hand(f)
    assert len(reads) == 2 and not cache.exists()


def test_directory_keeps_its_definition_and_is_cached(tmp_path, cache, reads):
    d = tmp_path / "st"
    (d / "sub").mkdir(parents=True)
    for name, data in (("model-00002.safetensors", b"2" * 50), ("model-00001.safetensors", b"1" * 70)):
        old_file(d / name, data)
    old_file(d / "sub" / "config.json", b"{}")
    assert digest.file_sha256(d) == by_hand(d)
    assert len(reads) == 3
    assert digest.file_sha256(d) == by_hand(d)
    assert len(reads) == 3
    old_file(d / "extra.json", b"[]")  # a new file in the directory: hashed again
    assert digest.file_sha256(d) == by_hand(d)
    assert len(reads) == 7


@pytest.mark.parametrize("value", ["", "off"])
def test_cache_can_be_disabled(tmp_path, monkeypatch, reads, value):
    monkeypatch.setenv(digest.CACHE_ENV, value)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    f = old_file(tmp_path / "ck.npz", b"x" * 10)
    assert digest.file_sha256(f) == digest.file_sha256(f) == by_hand(f)
    assert len(reads) == 2 and not (tmp_path / "xdg").exists()


def test_default_location_is_under_xdg_cache_home(tmp_path, monkeypatch, reads):
    monkeypatch.delenv(digest.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    f = old_file(tmp_path / "ck.npz", b"x" * 10)
    digest.file_sha256(f)
    assert digest.file_sha256(f) == by_hand(f) and len(reads) == 1
    assert (tmp_path / "xdg" / "parity" / "sha256.json").is_file()


def test_unwritable_cache_still_gives_the_digest(tmp_path, monkeypatch, reads):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv(digest.CACHE_ENV, str(tmp_path / "a_file" / "sha256.json"))  # its parent is a file
    f = old_file(tmp_path / "ck.npz", b"x" * 10)
    assert digest.file_sha256(f) == digest.file_sha256(f) == by_hand(f)
    assert len(reads) == 2
    assert not any(".tmp" in p.name for p in tmp_path.rglob("*"))


def test_progress_counts_bytes(tmp_path, cache):
    f = old_file(tmp_path / "ck.npz", b"x" * 1000)
    seen = []
    digest.file_sha256(f, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (1000, 1000)
