"""The block-streamed training step (parity/stream_train.py, issue 24 §1): the same step as the resident one of the
same implementation (the resident step differentiates the whole graph at once, independently of the unit-by-unit
VJPs), both implementations, attention-only and every leaf trainable, two SGD steps; the CLI's --grads; the
refusal of the float16 modes in one line; the automatic choice under a small memory limit.

Not bit-exact: the head's backward sums d loss / d x over the vocabulary a chunk of the table at a time, so its
float32 sum is rounded in another order (torch with one chunk of the whole table is bit-identical, measured); jax
compiles each unit alone, so XLA fuses differently from the resident graph. Measured on the tiny model: within
8e-7 of each leaf's largest gradient."""

import dataclasses
import os

import numpy as np
import pytest
from click.testing import CliRunner
from test_train_step import KEY_BIAS, train_inputs

from parity import estimate, stream, train_run
from parity.cli import main
from parity.config import TINY_VARIANTS
from parity.errors import ParityError
from parity.job import Job
from parity.training import TrainOptions
from tests.ckpt_helpers import write_npz

CFG = TINY_VARIANTS["tiny-pg2-gqa"]
ATTENTION = ("llm/layers/attn/*",)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream_train")
    ckpt, inputs = str(d / "tiny.f32.npz"), str(d / "train.npz")
    write_npz(ckpt, CFG, np.float32, seed=3, prefix=False)
    np.savez(inputs, **train_inputs(CFG, seed=2, length=(14, 10), prefix=(3, 6)))
    return ckpt, inputs


def _step(files, impl, trainable, streamed, steps=2):
    ckpt, inputs = files
    job = Job(checkpoint=ckpt, inputs=inputs, impl=impl, train=TrainOptions(trainable=trainable, steps=steps))
    rec = train_run.train(dataclasses.replace(job, stream=streamed))
    assert rec.streamed == bool(streamed)
    return rec.result


def _close(a, b, scale):
    """Within 1e-6 of `scale`."""
    assert a.shape == b.shape and a.dtype == b.dtype == np.float32
    assert np.max(np.abs(a.astype(np.float64) - b)) <= 1e-6 * scale


@pytest.mark.parametrize("impl", ["torch", "jax"])
@pytest.mark.parametrize("trainable", [ATTENTION, ("all",)], ids=["attention", "all"])
def test_streamed_step_equals_resident(files, impl, trainable):
    resident = _step(files, impl, trainable, False)
    streamed = _step(files, impl, trainable, True)
    assert len(resident.steps) == len(streamed.steps) == 2
    for r, s in zip(resident.steps, streamed.steps, strict=True):
        assert abs(r.loss - s.loss) <= 1e-6 * abs(r.loss), (r.step, r.loss, s.loss)
        np.testing.assert_allclose(s.example_loss, r.example_loss, rtol=1e-6)
        np.testing.assert_allclose(s.grad_norm, r.grad_norm, rtol=1e-5)
        assert set(r.leaf_weight_norm) == set(s.leaf_weight_norm) == set(r.leaf_grad_norm) == set(s.leaf_grad_norm)
        for k, w in r.leaf_weight_norm.items():
            np.testing.assert_allclose(s.leaf_weight_norm[k], w, rtol=1e-6, err_msg=k)
    assert list(resident.grads) == list(streamed.grads) and len(resident.grads) > 1
    largest = max(float(np.max(np.abs(g))) for g in resident.grads.values())
    for k, g in resident.grads.items():
        # the key bias's true gradient is exactly zero (softmax shift invariance): its float32 value is noise,
        # compared against the step's gradient scale instead of its own
        _close(g, streamed.grads[k], largest if k.endswith(KEY_BIAS) else float(np.max(np.abs(g))))
    for k, p in resident.params.items():
        _close(p, streamed.params[k], float(np.max(np.abs(p))))
    assert resident.empty_rows == streamed.empty_rows


def test_cli_writes_the_resident_grads(files, tmp_path):
    ckpt, inputs = files
    out = {}
    for mode in ("resident", "streamed"):
        grads = str(tmp_path / f"{mode}.grads.npz")
        args = ["train-step", ckpt, "--inputs", inputs, "--impl", "torch", "--grads", grads, "--json"]
        r = CliRunner().invoke(main, args + (["--stream"] if mode == "streamed" else []))
        assert r.exit_code == 0, r.output
        assert f'"execution": "{mode}"' in r.output
        with np.load(grads) as z:
            out[mode] = dict(z)
    assert list(out["resident"]) == list(out["streamed"])
    for k, g in out["resident"].items():
        _close(g, out["streamed"][k], float(np.max(np.abs(g))))


@pytest.mark.parametrize(
    "flags", [["--frozen-dtype", "float16"], ["--vit-matmul-dtype", "float16"]], ids=["frozen", "vit"]
)
def test_float16_modes_are_refused_in_one_line(files, tmp_path, flags):
    ckpt, inputs = files
    grads = tmp_path / "g.npz"
    args = ["train-step", ckpt, "--inputs", inputs, "--stream", "--grads", str(grads), *flags]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert len(lines) == 1 and "float32 only" in lines[0] and flags[0] in lines[0], r.output
    assert not grads.exists()


def test_a_step_that_does_not_fit_resident_streams_and_says_so(files, monkeypatch):
    """Under a limit the resident step exceeds but the streamed one fits, the step streams and one line says so;
    a float16 mode never streams by itself (it is refused instead, naming the need)."""
    ckpt, inputs = files
    monkeypatch.setattr(estimate, "STREAM_BASE", 0.0)  # the tiny model's streamed need: a few MB
    monkeypatch.setenv(estimate.ENV_LIMIT, "100M")  # the resident need: the framework's runtime alone is more
    monkeypatch.delenv(estimate.ENV_CHECK, raising=False)
    said: list[str] = []
    job = Job(checkpoint=ckpt, inputs=inputs, impl="torch", train=TrainOptions(trainable=ATTENTION))
    rec = train_run.train(job, warn=said.append)
    assert rec.streamed and np.isfinite(rec.result.steps[0].loss)
    assert len(said) == 1 and "\n" not in said[0], said
    for part in ("a training step", "resident", "PARITY_MEMORY_LIMIT=100M", "block-streamed"):
        assert part in said[0], (part, said[0])
    half = dataclasses.replace(job, train=TrainOptions(trainable=ATTENTION, frozen_dtype="float16"))
    with pytest.raises(estimate.MemoryRefused) as e:
        train_run.train(half)
    assert "float16 training modes run resident only" in str(e.value) and "more than available" not in str(e.value)


def test_streamed_step_holds_one_unit_at_a_time(files, monkeypatch):
    """The step reads every frozen unit from the checkpoint by unit (never the whole file at once): the largest
    read is one unit's, and a trainable leaf is read once, then held."""
    reads: list[int] = []
    real = stream.Source.read

    def read(self, keys, layer=None):
        out = real(self, keys, layer)
        reads.append(sum(v.nbytes for v in out.values()))
        return out

    monkeypatch.setattr(stream.Source, "read", read)
    _step(files, "torch", ATTENTION, True, steps=1)
    total = os.path.getsize(files[0])
    assert reads and max(reads[1:]) < total / 4, (max(reads), total)


def test_unknown_impl_is_refused(files):
    ckpt, inputs = files
    job = Job(checkpoint=ckpt, inputs=inputs, impl="transformers", train=TrainOptions(), stream=True)
    with pytest.raises(ParityError, match="implementation 'transformers' does not run block-streamed") as info:
        train_run.train(job)
    assert info.value.exit_code == 2 and "\n" not in str(info.value)
