"""`parity train-step` end to end (issue 22): on the shipped tiny checkpoint with inputs made by
`parity inputs --suffix`, its report, its --grads file and its -o checkpoint in every format (checked against the
input checkpoint and against w - lr * g), and its bad input: one line, exit 2 (exit 1 for a NaN), nothing written."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from converters.checkpoint import open_checkpoint
from parity import spec
from parity.cli import main
from parity.config import TINY_VARIANTS
from tests import signal_child

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "golden")
CKPT = os.path.join(GOLDEN, "tiny-pg2-gqa.b16.npz")
TOKENIZER = os.path.join(GOLDEN, "tokenizer.model")
CFG = TINY_VARIANTS["tiny-pg2-gqa"]
ATTN = ["llm/layers/attn/q_einsum/w", "llm/layers/attn/kv_einsum/w", "llm/layers/attn/attn_vec_einsum/w"]
HF = ("--impl", "transformers", "--convention", "transformers")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def train_inputs(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("train")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (30, 24, 3), dtype=np.uint8)).save(d / f"{name}.png")
    out = d / "train.npz"
    r = invoke(
        "inputs", d / "a.png", d / "b.png", "--prefix", "caption en", "--suffix", "a cat on a mat",
        "--suffix", "two dogs", "--tokenizer", TOKENIZER, "--config", "tiny-pg2-gqa", "-o", out,
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    return str(out)


def original():
    with open_checkpoint(CKPT) as ck:
        return ck.load()


def test_transformers_step_report_grads_and_updated_checkpoint(train_inputs, tmp_path):
    grads, up = tmp_path / "g.npz", tmp_path / "up.npz"
    lr = 0.25
    r = invoke("train-step", CKPT, "--inputs", train_inputs, *HF, "--lr", lr, "--grads", grads, "-o", up, "--json")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    [s] = rep["steps"]
    assert s["step"] == 1 and len(s["example_loss"]) == 2 and math.isfinite(s["loss"])
    assert sorted(rep["trainable"]) == sorted(ATTN)
    g = np.load(grads)
    assert sorted(g.files) == sorted(ATTN)  # the trainable leaves, and no other
    shapes = spec.canonical_shapes(CFG)
    for k in ATTN:
        assert g[k].dtype == np.float32 and g[k].shape == shapes[k]
        assert s["leaf_grad_norm"][k] == pytest.approx(float(np.linalg.norm(g[k].astype(np.float64))), rel=1e-6)
    assert s["grad_norm"] == pytest.approx(math.sqrt(sum(float((g[k].astype(np.float64) ** 2).sum()) for k in ATTN)))
    before = original()
    with open_checkpoint(up) as ck:
        after = ck.load()
        dts = {e.key: ck.dtype(e) for e in ck.entries()}
    for k, v in before.items():
        if k in ATTN:  # float32, exactly one SGD step from the stored (bfloat16) weights
            assert dts[k] == np.float32
            want = v.astype(np.float32) - np.float32(lr) * g[k]
            np.testing.assert_allclose(after[k], want, rtol=0, atol=1e-6)
            assert not np.array_equal(after[k], v.astype(np.float32))
        else:
            assert after[k].dtype == v.dtype and after[k].tobytes() == v.tobytes(), k  # frozen: bit-identical
    # every other command reads it
    assert invoke("inspect", up).exit_code == 0
    r = invoke("capture", up, "--inputs", train_inputs, "--points", "logits", "-o", tmp_path / "c.safetensors")
    assert r.exit_code == 0, r.stderr


@pytest.mark.parametrize("to", ["safetensors", "orbax"])
def test_updated_checkpoint_in_other_formats(train_inputs, tmp_path, to):
    if to == "orbax":
        pytest.importorskip("tensorstore")
    npz, other = tmp_path / "up.npz", tmp_path / f"up-{to}"
    r = invoke("train-step", CKPT, "--inputs", train_inputs, *HF, "-o", npz)
    assert r.exit_code == 0, r.stderr
    r = invoke("train-step", CKPT, "--inputs", train_inputs, *HF, "-o", other, "--to", to)
    assert r.exit_code == 0, r.stderr
    with open_checkpoint(npz) as a, open_checkpoint(other) as b:
        pa, pb = a.load(), b.load()
    for k in pa:
        assert pa[k].dtype == pb[k].dtype and pa[k].tobytes() == pb[k].tobytes(), k


def test_several_steps_and_the_human_report(train_inputs):
    r = invoke("train-step", CKPT, "--inputs", train_inputs, *HF, "--steps", "3", "--lr", "0.1", "--json")
    assert r.exit_code == 0, r.stderr
    losses = [s["loss"] for s in json.loads(r.stdout)["steps"]]
    assert len(losses) == 3 and losses[2] < losses[1] < losses[0]  # SGD on one batch descends
    r = invoke("train-step", CKPT, "--inputs", train_inputs, *HF, "--steps", "2", "--trainable", "llm/*")
    assert r.exit_code == 0, r.stderr
    assert "per-example loss" in r.stdout and "llm/final_norm/scale" in r.stdout and "grad/weight" in r.stdout


@pytest.mark.parametrize("impl", ["torch", "jax"])
def test_our_implementations_train(train_inputs, tmp_path, impl):
    grads = tmp_path / "g.npz"
    r = invoke("train-step", CKPT, "--inputs", train_inputs, "--impl", impl, "--steps", "2", "--grads", grads, "--json")
    assert r.exit_code == 0, r.stderr
    steps = json.loads(r.stdout)["steps"]
    assert [s["step"] for s in steps] == [1, 2] and len(steps[0]["example_loss"]) == 2
    assert sorted(np.load(grads).files) == sorted(ATTN)


# -- bad input ----------------------------------------------------------------------------------------------------
def one_line_exit(r, code, *fragments):
    assert r.exit_code == code, (r.exit_code, r.output)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    for f in fragments:
        assert f in r.stderr, (f, r.stderr)


def test_inputs_without_mask_loss(tmp_path):
    r = invoke("train-step", CKPT, "--inputs", os.path.join(GOLDEN, "tiny-inputs.npz"), *HF, "-o", tmp_path / "u.npz")
    one_line_exit(r, 2, "mask_loss", "`parity inputs --suffix`")
    assert os.listdir(tmp_path) == []


def test_bad_options(train_inputs, tmp_path):
    r = invoke("train-step", CKPT, "--inputs", train_inputs, *HF, "--trainable", "llm/layers/atn/*")
    one_line_exit(r, 2, "'llm/layers/atn/*' matches no leaf", *spec.canonical_shapes(CFG))
    for args, what in [
        (("--lr", "-0.1"), "--lr"),
        (("--lr", "nan"), "--lr"),
        (("--lr", "inf"), "--lr"),
        (("--steps", "0"), "--steps"),
        (("-o", tmp_path / "updated"), "--to"),
    ]:
        one_line_exit(invoke("train-step", CKPT, "--inputs", train_inputs, *HF, *args), 2, what)
    (tmp_path / "exists.npz").write_bytes(b"x")
    r = invoke("train-step", CKPT, "--inputs", train_inputs, *HF, "-o", tmp_path / "exists.npz")
    one_line_exit(r, 2, "--overwrite")
    assert sorted(os.listdir(tmp_path)) == ["exists.npz"]


def test_backend_without_train_step(train_inputs, monkeypatch):
    import types

    from parity import backend

    monkeypatch.setattr(backend, "get", lambda name: types.SimpleNamespace(name=name))
    one_line_exit(invoke("train-step", CKPT, "--inputs", train_inputs, *HF), 2, "no training step")


def test_nan_loss_exits_1_naming_the_step(train_inputs, tmp_path):
    params = original()
    params = {k: v.astype(np.float32) for k, v in params.items()}
    params["llm/final_norm/scale"][0] = np.nan
    bad = tmp_path / "nan.npz"
    np.savez(bad, **{spec.NPZ_PREFIX + k: v for k, v in params.items()})
    (tmp_path / "nan.npz.parity.json").write_text(CFG.to_json())
    r = invoke(
        "train-step", bad, "--inputs", train_inputs, *HF, "--grads", tmp_path / "g.npz", "-o", tmp_path / "u.npz"
    )
    one_line_exit(r, 1, "step 1", "not finite")
    assert sorted(os.listdir(tmp_path)) == ["nan.npz", "nan.npz.parity.json"]


SLOW_WRITE = """
import faulthandler, signal, sys, time
faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for every thread's stack if it hangs
import converters.convert as c
def write_npz(ck, tmp, dtype, progress):
    with open(tmp, "wb") as f:
        f.write(b"partial")
    print("writing", file=sys.stderr, flush=True)
    for _ in range(1200):  # convert's writers return to Python for every chunk they write
        time.sleep(0.05)
c.write_npz = write_npz
from parity.cli import main
main()
"""


def test_interrupt_while_writing_leaves_nothing(train_inputs, tmp_path):
    """The stand-in writer waits in 50 ms slices, not one 60 s sleep: CPython runs a signal's handler at its next
    bytecode boundary, and a signal that lands after the last one and before a blocking call starts is only acted on
    when that call returns. Measured here: a bare `print(flush=True); time.sleep(60)` child sent SIGINT the moment it
    printed, 400 times beside 4 busy loops, stayed asleep 3 times (60 s), exactly as this test's earlier 60 s stand-in
    failed 3 of 200 loop runs (faulthandler: still in the sleep 30 s after SIGINT, interrupted the instant SIGUSR1
    woke it). The real writers return to Python for every chunk (converters.convert.write_npz's loop)."""
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "-c", SLOW_WRITE, "train-step", CKPT, "--inputs", train_inputs, *HF]
    cmd += ["--grads", str(out / "g.npz"), "-o", str(out / "u.npz")]
    # SIGINT at its default disposition in the child, whatever this suite inherited (nohup, a background job)
    p = signal_child.popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        line = p.stderr.readline().strip()
        assert line == "writing", line + p.stderr.read()
        assert os.listdir(out)  # the temporaries exist now
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        try:
            rc = p.wait(timeout=30)
        except subprocess.TimeoutExpired:  # name where it hangs: every thread's stack, then fail
            p.send_signal(signal.SIGUSR1)
            time.sleep(2)
            p.kill()
            pytest.fail("no exit within 30 s of SIGINT; the child's threads:\n" + p.stderr.read())
        assert rc == 130 and time.monotonic() - t0 < 15
    finally:
        p.kill()
    assert os.listdir(out) == []  # neither the gradients nor the checkpoint, nor a temporary


def test_job_round_trips_its_training_options():
    from parity.job import Job
    from parity.training import TrainOptions

    opts = TrainOptions(trainable=("llm/*", "img/embedding/*"), steps=3, lr=0.5, frozen_dtype="float16")
    job = Job(CKPT, "train.npz", train=opts, grads="g.npz", updated="u", updated_format="orbax")
    back = Job.from_json(job.to_json())
    assert back == job and back.train == opts and isinstance(back.train, TrainOptions)
    assert Job.from_json(Job(CKPT, "x.npz").to_json()).train is None
