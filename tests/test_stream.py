"""Block-streamed runs (parity/stream.py, issue 24 §1): the same points as the resident run of the same file in the
same dtype, for every format and both implementations; the automatic choice under a small memory limit; a file
changed or truncated mid-run refused in one line (exit 2), nothing written. Streamed generation:
tests/test_stream_generate.py."""

import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from parity import estimate, monitor, pipeline, run
from parity import points as pts
from parity.cli import main
from parity.errors import CheckpointError, ParityError
from parity.job import Job
from tests.ckpt_helpers import every_format

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN_CKPT = os.path.join(ROOT, "golden", "tiny-pg2-gqa.b16.npz")  # bf16 stored as |V2, with the params/ prefix
INPUTS = os.path.join(ROOT, "golden", "tiny-inputs.npz")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny checkpoint in every format: float32 npz (no prefix), bf16 npz, safetensors, orbax."""
    return every_format(tmp_path_factory.mktemp("stream"), GOLDEN_CKPT)


def _points(job: Job) -> dict[str, np.ndarray]:
    loaded = pipeline.load(job)
    try:
        return loaded.backend.forward(loaded.model, loaded.inputs, pts.forward_points(loaded.config))
    finally:
        pipeline.stream.close(loaded.model)


def _same(resident, streamed, impl, exact_logits=None):
    """Bit-exact, except jax's logits and float64 logits: the CPU dot (XLA's; torch's float64 gemm) sums the D axis
    in another order for a chunk of the table than for the whole table, within 1e-6 of the logits' scale."""
    exact_logits = impl == "torch" if exact_logits is None else exact_logits
    assert list(resident) == list(streamed)
    for k, a in resident.items():
        b = streamed[k]
        assert a.shape == b.shape and a.dtype == b.dtype, k
        if not exact_logits and k == pts.LOGITS:
            scale = float(np.max(np.abs(a)))
            assert np.max(np.abs(a.astype(np.float64) - b)) <= 1e-6 * scale, k
        else:
            np.testing.assert_array_equal(a, b, err_msg=k)


@pytest.mark.parametrize("impl", ["torch", "jax"])
@pytest.mark.parametrize("fmt", ["npz", "bf16 npz", "safetensors", "orbax"])
def test_streamed_equals_resident_every_format(files, fmt, impl):
    job = Job(files[fmt], INPUTS, impl)
    streamed = _points(Job(files[fmt], INPUTS, impl, stream=True))
    _same(_points(job), streamed, impl)


@pytest.mark.parametrize(
    "dtype,compute", [("bfloat16", None), ("bfloat16", "float32"), ("float64", None)]
)  # bf16 compute; bf16 values computed in float32 (rounded on read, as the resident load rounds them); float64
def test_streamed_equals_resident_other_dtypes(files, dtype, compute):
    kw = {"dtype": dtype, "compute_dtype": compute}
    _same(
        _points(Job(files["npz"], INPUTS, "torch", **kw)),
        _points(Job(files["npz"], INPUTS, "torch", stream=True, **kw)),
        "torch",
        exact_logits=dtype != "float64",
    )


def test_streamed_reads_one_unit_at_a_time(files):
    """Only the units up to the last point asked for run; the manifest says the run was streamed."""
    loaded = pipeline.load(Job(files["npz"], INPUTS, "torch", stream=True))
    src = loaded.model.source
    out = loaded.backend.forward(loaded.model, loaded.inputs, [pts.img_block_out(0)])
    first = src.bytes_read
    assert list(out) == [pts.img_block_out(0)] and loaded.manifest["execution"] == "streamed"
    total = sum(int(np.prod(e.shape)) * 4 for e in src.entries.values())
    assert 0 < first < total / 4  # the patch embedding and one ViT block, not the model
    pipeline.stream.close(loaded.model)


def test_streamed_teacher_forced_compare(files):
    """compare --teacher-forced with both sides streamed: every unit run on side A's inputs, verdict pass, and B's
    teacher-forced units equal a resident B's (bit-exact but jax's chunked head, within 1e-6 of scale)."""
    from parity import compare as cmp

    c = cmp.compare(
        "torch", "jax", ckpt=files["bf16 npz"], inputs=INPUTS, teacher_forced=True, stream=True, isolate=False
    )
    d = c.to_dict()
    assert c.exit_code == 0, d.get("verdict")


def test_teacher_units_equal_resident(files, tmp_path):
    ref = str(tmp_path / "ref.safetensors")
    run.capture(files["npz"], INPUTS, ref, impl="torch")
    outs = {}
    for stream in (None, True):
        cap, teach = str(tmp_path / f"c{stream}.safetensors"), str(tmp_path / f"t{stream}.safetensors")
        job = Job(files["npz"], INPUTS, "jax", capture=cap, teacher_from=ref, teacher_output=teach, stream=stream)
        pipeline.record_run(job)
        from parity.capture_file import read_capture

        outs[stream] = read_capture(teach)[0]
    _same(outs[None], outs[True], "jax")
    assert pts.LOGITS in outs[True] and pts.llm_block_out(0) in outs[True]


def test_automatic_choice_says_it_streams_in_one_line(files, tmp_path, monkeypatch):
    """Under a limit the resident run exceeds but the streamed one fits, the run streams and one line says so."""
    monkeypatch.setattr(estimate, "STREAM_BASE", 0.0)  # the tiny model's streamed need: a few MB
    monkeypatch.setenv(estimate.ENV_LIMIT, "100M")  # the resident need: the framework's runtime alone is more
    monkeypatch.delenv(estimate.ENV_CHECK, raising=False)
    said: list[str] = []
    out = str(tmp_path / "c.safetensors")
    m = run.capture(files["npz"], INPUTS, out, warn=said.append)
    assert m["execution"] == "streamed" and os.path.exists(out)
    assert len(said) == 1 and "\n" not in said[0], said
    for part in ("resident", "0.10 GB is available", "PARITY_MEMORY_LIMIT=100M", "block-streamed"):
        assert part in said[0], (part, said[0])
    monkeypatch.setenv(estimate.ENV_LIMIT, "1K")  # fits neither way: refused, naming the streamed need
    with pytest.raises(estimate.MemoryRefused, match="block-streamed it needs"):
        run.capture(files["npz"], INPUTS, str(tmp_path / "d.safetensors"))


def test_file_changed_mid_run_is_refused(files, tmp_path):
    """The checkpoint rewritten (same bytes, new inode and mtime) after the first block: refused, nothing written."""
    ckpt = str(tmp_path / "moving.npz")
    shutil.copy(files["npz"], ckpt)
    out = str(tmp_path / "c.safetensors")

    def rewrite(unit: str) -> None:
        if not os.path.exists(ckpt + ".done"):
            shutil.copy(files["npz"], ckpt + ".tmp")
            os.replace(ckpt + ".tmp", ckpt)
            open(ckpt + ".done", "w").close()

    with monitor.reporting(rewrite), pytest.raises(CheckpointError) as info:
        run.capture(ckpt, INPUTS, out, stream=True)
    msg = str(info.value)
    assert info.value.exit_code == 2 and "\n" not in msg and "changed on disk" in msg and ckpt in msg
    assert os.path.exists(ckpt + ".done") and not os.path.exists(out)


def test_truncated_file_fails_in_one_line(files, tmp_path):
    """A safetensors checkpoint whose data ends early: one line naming the file, exit 2, nothing written."""
    bad = str(tmp_path / "cut")
    shutil.copytree(files["safetensors"], bad)
    name = next(f for f in os.listdir(bad) if f.endswith(".safetensors"))
    with open(os.path.join(bad, name), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(bad, name)) - 1000)
    out = tmp_path / "c.safetensors"
    r = CliRunner().invoke(main, ["capture", bad, "--inputs", INPUTS, "-o", str(out), "--stream"])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and name in lines[0], r.output
    assert not out.exists()


def test_a_training_step_streams_when_asked_and_other_impls_say_they_do_not(files):
    """A training step streams now (tests/test_stream_train.py); --stream with an implementation that has no
    streaming hook is refused in one line, exit 2, before anything is read."""
    from parity.config import TINY_VARIANTS

    cfg, work = TINY_VARIANTS["tiny-pg2-gqa"], estimate.Work("train", trainable=10)
    text = {"text": np.zeros((1, 4), np.int32)}
    est = estimate.check_fits(cfg, text, "torch", "float32", "float32", 4, work, stream=True)
    assert est.stream and est.peak == est.streamed
    with pytest.raises(ParityError, match="implementation 'transformers' does not run block-streamed") as info:
        estimate.check_fits(cfg, text, "transformers", "float32", "float32", 4, work, stream=True)
    assert info.value.exit_code == 2 and "\n" not in str(info.value)
