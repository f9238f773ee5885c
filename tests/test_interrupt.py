"""Interruption and concurrent writers: the real CLI in a subprocess, stopped (SIGSTOP) mid-conversion, then sent
SIGINT / SIGTERM / SIGHUP / SIGKILL; a second writer while the first is alive; --overwrite replacing under SIGKILL.
Afterwards the destination holds either nothing, the old complete output or the new one, and no temporary is left
(except the stale one SIGKILL must leave, which the next run names and --overwrite removes)."""

import dataclasses
import filecmp
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner

from converters import atomic
from converters.convert import background, convert
from parity import spec
from parity.cli import main
from parity.config import TINY_VARIANTS
from tests import signal_child

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def big_config():
    """tiny-pg2-gqa scaled up to ~80 MB of float32: long enough to be stopped while writing, quick to make."""
    base = TINY_VARIANTS["tiny-pg2-gqa"]
    t = dataclasses.replace(
        base.text, width=512, depth=4, mlp_dim=2048, num_heads=8, num_kv_heads=4, head_dim=64, vocab_size=8192
    )
    return dataclasses.replace(base, name="big-test", text=t)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    d = tmp_path_factory.mktemp("big")
    cfg = big_config()
    paths = {}
    for seed in (0, 1):
        p = d / f"big{seed}.npz"
        np.savez(p, **{spec.NPZ_PREFIX + k: v for k, v in spec.random_params(cfg, seed=seed).items()})
        (d / f"big{seed}.npz.parity.json").write_text(cfg.to_json())
        paths[seed] = str(p)
    paths["st"] = str(d / "big0-st")
    convert(paths[0], paths["st"], "safetensors")
    return paths


# The real CLI, with one addition: it stops itself (SIGSTOP) once `stop_at` bytes have been handed to the writer,
# with the output's temporary open and partly written. A SIGSTOP sent from outside at that moment raced the
# conversion (and skipped the test when the conversion won); stopped from inside, every run is stopped midway.
STOPPING_CLI = """
import os, signal
import converters.convert as convert
stop_at, real, stopped = int(os.environ["PARITY_TEST_STOP_AT"]), convert._Meter.take, []
def take(self, stream, nbytes, key):
    for chunk in real(self, stream, nbytes, key):
        yield chunk
        if 0 < stop_at <= self.done and not stopped:
            stopped.append(True)
            os.kill(os.getpid(), signal.SIGSTOP)
convert._Meter.take = take
from parity.cli import main
main()
"""


def start(*args, stop_at=0, ignore=()):
    """The CLI in a child with SIGINT/SIGHUP/SIGTERM at their default disposition (or ignored: `ignore`), whatever
    this process inherited (tests/signal_child.py); it stops itself after `stop_at` bytes (0: never)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "PARITY_TEST_STOP_AT": str(stop_at)}
    return signal_child.popen(
        [sys.executable, "-c", STOPPING_CLI, *map(str, args)],
        ignore=ignore,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def cli(*args):
    """A follow-up run in this process (click's runner): (exit status, stderr)."""
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stderr


def temps(dst):
    return [p for p, _, _ in atomic.temporaries(str(dst))]


def written(tmp):
    if os.path.isdir(tmp):
        return sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
    return os.path.getsize(tmp)


def wait_stopped(proc, timeout=60) -> bool:
    """Wait until SIGSTOP has taken effect (state T in /proc/PID/stat). A process inside an uninterruptible
    system call (an fsync on a busy disk) runs on until it returns from it, so checking the files right after
    sending the signal could see a state that changes under the test. False if it exited first."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            with open(f"/proc/{proc.pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        if state in ("T", "t"):
            return True
        if state in ("Z", "X"):
            return False
        time.sleep(0.001)
    proc.kill()  # not left behind, stopped, when the test fails
    pytest.fail(f"the process did not stop within {timeout} s of SIGSTOP")


def stop_midway(proc, dst, timeout=120, replacing=False):
    """Wait until the child has stopped itself (start's `stop_at`) and return its temporary, checked to be there
    (partly written) while the destination is not (or is, when `replacing` an old output)."""
    if not wait_stopped(proc, timeout):
        code, err = finish(proc)
        pytest.fail(f"the conversion ended (exit {code}) before it stopped itself: {err[-2000:]}")
    found = temps(dst)
    assert len(found) == 1 and os.path.lexists(dst) == replacing, (found, os.path.lexists(dst))
    assert written(found[0]) > 0  # partly written
    return found[0]


def signal_sets(pid):
    with open(f"/proc/{pid}/status") as f:
        return signal_child.proc_masks(f.read())


def finish(proc, timeout=60):
    """Wait for the process (a hang fails the test instead of blocking the suite)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("hang: the process did not end after the signal")
    return proc.returncode, err


def interrupted(big, tmp_path, direction, sig, min_bytes=1 << 20):
    src, to = (big[0], "safetensors") if direction == "npz->st" else (big["st"], "npz")
    dst = tmp_path / ("out" if to == "safetensors" else "out.npz")
    proc = start("convert", src, "-o", dst, "--to", to, stop_at=min_bytes)
    tmp = stop_midway(proc, dst)
    if sig != signal.SIGKILL:  # the child handles it (Python's SIGINT handler; atomic's SIGTERM/SIGHUP cleanup)
        assert sig in signal_sets(proc.pid)["SigCgt"], signal_sets(proc.pid)
    os.kill(proc.pid, sig)
    os.kill(proc.pid, signal.SIGCONT)
    code, err = finish(proc)
    return dst, tmp, code, err, proc.pid


@pytest.mark.parametrize(
    "sig,direction",
    [(signal.SIGINT, "st->npz"), (signal.SIGINT, "npz->st"), (signal.SIGTERM, "st->npz"), (signal.SIGHUP, "npz->st")],
)
def test_signal_midway_leaves_nothing(big, tmp_path, direction, sig):
    dst, tmp, code, err, _ = interrupted(big, tmp_path, direction, sig)
    if sig == signal.SIGINT:
        assert code != 0 and "Traceback" not in err, err
    else:
        assert code == -sig, (code, err)  # cleaned up, then ended by the signal itself (exit status 128 + n)
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)


@pytest.mark.parametrize(
    "ignored,direction",
    [
        ((signal.SIGINT,), "st->npz"),
        ((signal.SIGHUP,), "npz->st"),
        ((signal.SIGTERM,), "npz->st"),
        ((signal.SIGINT, signal.SIGHUP), "st->npz"),  # what `nohup cmd &` from a script leaves
    ],
)
def test_an_inherited_ignored_signal_stays_ignored(big, tmp_path, ignored, direction):
    """The Unix convention (what `nohup` asks for): a signal the process inherited as ignored is not caught. Sent
    midway, it changes nothing: the conversion completes, exit 0, the output whole and equal to an undisturbed one."""
    src, to = (big[0], "safetensors") if direction == "npz->st" else (big["st"], "npz")
    dst = tmp_path / ("out" if to == "safetensors" else "out.npz")
    proc = start("convert", src, "-o", dst, "--to", to, stop_at=1 << 20, ignore=ignored)
    stop_midway(proc, dst)
    sets = signal_sets(proc.pid)
    assert set(ignored) <= sets["SigIgn"] and not set(ignored) & sets["SigCgt"], sets
    for sig in ignored:
        os.kill(proc.pid, sig)
    os.kill(proc.pid, signal.SIGCONT)
    code, err = finish(proc)
    assert code == 0, (code, err)
    if to == "safetensors":
        assert sorted(os.listdir(tmp_path)) == ["out"] and sorted(os.listdir(dst)) == [
            "config.json",
            "model.safetensors",
        ]
        assert filecmp.cmp(dst / "model.safetensors", os.path.join(big["st"], "model.safetensors"), shallow=False)
    else:
        assert sorted(os.listdir(tmp_path)) == ["out.npz", "out.npz.parity.json"]
        ref = tmp_path.parent / f"{tmp_path.name}-ref.npz"
        convert(big["st"], ref, "npz")
        try:
            assert filecmp.cmp(dst, ref, shallow=False)
        finally:
            atomic.remove_path(str(ref))
            atomic.remove_path(str(ref) + ".parity.json")


def test_children_start_with_the_dispositions_asked_for(tmp_path):
    """tests/signal_child.py: the child's dispositions are the ones asked for even when its parent ignores them
    (the parent here is itself started with SIGINT/SIGHUP/SIGTERM ignored, as under `nohup ... &`)."""
    inner = """
import signal, subprocess, sys
sys.path.insert(0, sys.argv[1])
from tests.signal_child import command
status = ["cat", "/proc/self/status"]
print(open("/proc/self/status").read(), "---")
print(subprocess.run(command(status), capture_output=True, text=True).stdout, "---")
print(subprocess.run(command(status, ignore=(signal.SIGHUP,)), capture_output=True, text=True).stdout)
"""
    trio = (signal.SIGINT, signal.SIGHUP, signal.SIGTERM)
    outer = signal_child.command([sys.executable, "-c", inner, ROOT], ignore=trio)
    r = subprocess.run(outer, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    parent, child, nohup = (signal_child.proc_masks(t) for t in r.stdout.split("---"))
    assert set(trio) <= parent["SigIgn"]
    assert not set(signal_child.SET) & (child["SigIgn"] | child["SigBlk"]), child
    assert nohup["SigIgn"] & set(signal_child.SET) == {signal.SIGHUP}, nohup


def test_sigkill_leaves_a_stale_temporary_named_and_removed_next_time(big, tmp_path):
    dst, tmp, code, err, pid = interrupted(big, tmp_path, "npz->st", signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert os.path.exists(tmp) and f".{pid}." in os.path.basename(tmp)  # the pid is in the name
    code, err = cli("convert", big[0], "-o", dst, "--to", "safetensors")
    assert code == 2 and err.count("\n") == 1, err
    assert "stale temporary" in err and tmp in err and f"pid {pid}" in err
    convert(big[0], dst, "safetensors", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert filecmp.cmp(dst / "model.safetensors", os.path.join(big["st"], "model.safetensors"), shallow=False)


def test_second_writer_fails_while_the_first_is_alive(big, tmp_path):
    dst = tmp_path / "out.npz"
    a = start("convert", big["st"], "-o", dst, "--to", "npz", stop_at=1 << 20)
    tmp = stop_midway(a, dst)
    try:
        for extra in ([], ["--overwrite"]):
            code, err = cli("convert", big["st"], "-o", dst, "--to", "npz", *extra)
            assert code == 2 and err.count("\n") == 1, err
            assert f"another writer (pid {a.pid})" in err
            assert os.path.exists(tmp)  # the live writer's file is never touched, even with --overwrite
    finally:
        a.send_signal(signal.SIGCONT)
    code, err = finish(a)
    assert code == 0, err
    convert(big["st"], tmp_path / "ref.npz", "npz")
    assert filecmp.cmp(dst, tmp_path / "ref.npz", shallow=False)
    assert sorted(os.listdir(tmp_path)) == ["out.npz", "out.npz.parity.json", "ref.npz", "ref.npz.parity.json"]


def test_two_conversions_started_together_one_wins(big, tmp_path):
    dst = tmp_path / "out"
    procs = [start("convert", big[0], "-o", dst, "--to", "safetensors") for _ in range(2)]
    results = sorted(finish(p) for p in procs)
    assert [c for c, _ in results] == [0, 2], results
    assert results[1][1].count("\n") == 1 and ("another writer" in results[1][1] or "exists" in results[1][1])
    assert os.listdir(tmp_path) == ["out"]
    assert filecmp.cmp(dst / "model.safetensors", os.path.join(big["st"], "model.safetensors"), shallow=False)


@pytest.mark.parametrize("stop_at", [1 << 20, 60 << 20])
def test_sigkill_during_overwrite_keeps_old_or_new(big, tmp_path, stop_at):
    """The destination name always holds one complete output: the old one until the new one replaces it."""
    dst = tmp_path / "out"
    convert(big[1], dst, "safetensors")  # the old output (other values)
    old = (dst / "model.safetensors").read_bytes()
    new = open(os.path.join(big["st"], "model.safetensors"), "rb").read()
    proc = start("convert", big[0], "-o", dst, "--to", "safetensors", "--overwrite", stop_at=stop_at)
    tmp = stop_midway(proc, dst, replacing=True)
    proc.kill()
    finish(proc)
    got = (dst / "model.safetensors").read_bytes()
    assert got in (old, new) and sorted(os.listdir(dst)) == ["config.json", "model.safetensors"]
    assert got == old and os.path.exists(tmp)
    convert(big[0], dst, "safetensors", overwrite=True)  # removes the stale temporary too
    assert os.listdir(tmp_path) == ["out"] and (dst / "model.safetensors").read_bytes() == new


@pytest.mark.parametrize("exchange", [True, False])
@pytest.mark.parametrize("fail", [False, True])
def test_replace_directory_without_renameat2(tmp_path, monkeypatch, exchange, fail):
    """The fallback (rename aside, rename in, remove aside) restores the old output when the second rename fails."""
    dst = tmp_path / "d"
    dst.mkdir()
    (dst / "f").write_text("old")
    if not exchange:
        monkeypatch.setattr(atomic, "_renameat2", lambda: None)
    real = os.rename
    if fail:

        def rename(a, b):
            if (
                os.path.basename(str(a)).startswith(".d.")
                and not str(a).endswith(".old.partial")
                and str(b) == str(dst)
            ):
                raise OSError(5, "Input/output error")
            return real(a, b)

        monkeypatch.setattr(os, "rename", rename)
        if exchange:
            monkeypatch.setattr(atomic, "_rename2", lambda *a: False)
    try:
        with atomic.atomic_output(str(dst), True, overwrite=True) as tmp:
            with open(os.path.join(tmp, "f"), "w") as f:
                f.write("new")
    except Exception as e:
        assert fail and "Input/output error" in str(e)
    assert (dst / "f").read_text() == ("old" if fail else "new")
    assert os.listdir(tmp_path) == ["d"]


def test_outputs_respect_the_umask(tmp_path):
    src = tmp_path / "t.npz"
    cfg = TINY_VARIANTS["tiny-pg1-mqa"]
    np.savez(src, **{spec.NPZ_PREFIX + k: v for k, v in spec.random_params(cfg).items()})
    old = os.umask(0o027)
    try:
        convert(src, tmp_path / "o.npz", "npz")
        convert(src, tmp_path / "st", "safetensors")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "o.npz").st_mode & 0o777 == 0o640
    assert os.stat(tmp_path / "o.npz.parity.json").st_mode & 0o777 == 0o640
    assert os.stat(tmp_path / "st").st_mode & 0o777 == 0o750
    assert os.stat(tmp_path / "st" / "model.safetensors").st_mode & 0o777 == 0o640


@pytest.mark.parametrize("to", ["npz", "safetensors", "orbax"])
def test_every_output_file_is_on_disk_before_it_gets_its_name(tmp_path, monkeypatch, to):
    """fsync of each file and directory of the temporary happens before the rename, then of the parent: a crash
    right after a conversion never leaves a final name over blocks that were never written."""
    src = tmp_path / "t.npz"
    cfg = TINY_VARIANTS["tiny-pg1-mqa"]
    np.savez(src, **{spec.NPZ_PREFIX + k: v for k, v in spec.random_params(cfg).items()})
    events = []
    real_fsync, real_commit = atomic._fsync_path, atomic._commit
    monkeypatch.setattr(atomic, "_fsync_path", lambda p: (events.append(("fsync", p)), real_fsync(p)))
    monkeypatch.setattr(atomic, "_commit", lambda t, d, o: (events.append(("commit", t, d)), real_commit(t, d, o)))
    dst = tmp_path / f"out.{to}"
    convert(src, dst, to)
    commits = {e[2]: i for i, e in enumerate(events) if e[0] == "commit"}
    main_commit = commits[str(dst)]
    tmp = events[main_commit][1]
    flushed = {os.path.relpath(e[1], tmp) for e in events[:main_commit] if e[0] == "fsync" and e[1].startswith(tmp)}
    written = (
        {"."}
        | {os.path.relpath(os.path.join(r, f), dst) for r, ds, fs in os.walk(dst) for f in fs}
        | {os.path.relpath(os.path.join(r, d), dst) for r, ds, fs in os.walk(dst) for d in ds}
        if os.path.isdir(dst)
        else {"."}
    )
    assert written <= flushed, sorted(written - flushed)
    assert ("fsync", str(tmp_path)) in events[main_commit:]


@pytest.mark.parametrize("fail", ["consumer stops", "worker raises"])
def test_reader_thread_shutdown_cannot_deadlock(fail):
    """The deadlock of issue 10: the worker blocked putting its end marker into a full queue while the consumer
    waited in join(). Here the queue is full and the worker done when the consumer stops."""

    def items():
        yield from range(3)
        if fail == "worker raises":
            raise ValueError("read error")

    done = threading.Event()

    def consume():
        g = background(items(), depth=1)
        next(g)
        time.sleep(0.2)  # the worker fills the queue and reaches its end marker
        g.close()
        done.set()

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    assert done.wait(10), "background() shutdown deadlocked"
