"""Block-streamed generation (parity/stream_generate.py, issue 24 §1): the same tokens, step logits and KV caches as
the resident generate of the same file in the same dtype, for every format the stream reader accepts and both
implementations, greedy, sampled, stopped at <eos> and teacher-forced; `golden check` streamed passes the shipped
bundles and fails a planted change at the same point as resident; `parity generate --stream`, `compare --generate
--stream` and the automatic choice say what they do in one line."""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from parity import estimate, golden, pipeline, run
from parity import points as pts
from parity.cli import main
from parity.job import Job
from tests.ckpt_helpers import every_format

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "golden")
GOLDEN_CKPT = os.path.join(GOLDEN, "tiny-pg2-gqa.b16.npz")  # bf16 stored as |V2, with the params/ prefix
PG1 = os.path.join(GOLDEN, "tiny-pg1-mqa.npz")  # PaliGemma 1, multi-query attention, float32
INPUTS = os.path.join(GOLDEN, "tiny-inputs.npz")
STEPS = 5


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny checkpoint in every format: float32 npz (no prefix), bf16 npz, safetensors, orbax."""
    return every_format(tmp_path_factory.mktemp("stream-generate"), GOLDEN_CKPT)


def _generate(ckpt: str, impl: str, stream, dtype: str = "float32", **kw) -> dict:
    loaded = pipeline.load(Job(ckpt, INPUTS, impl, dtype=dtype, stream=stream))
    assert loaded.manifest.get("execution") == ("streamed" if stream else None)
    kw = {"return_logits": True, "capture": list(pts.cache_points(loaded.config)), **kw}
    try:
        return loaded.backend.generate(loaded.model, loaded.inputs, STEPS, **kw)
    finally:
        pipeline.stream.close(loaded.model)


def _same(resident: dict, streamed: dict, exact: bool) -> None:
    """Tokens identical; step logits and caches bit-exact (`exact`) or every value within 1e-6 of its point's scale
    (jax's one-token decode step: see docs/memory.md)."""
    assert sorted(resident) == sorted(streamed)
    np.testing.assert_array_equal(resident["tokens"], streamed["tokens"])
    for k, a in resident.items():
        if k in ("tokens", "decode_path"):
            continue
        b = streamed[k]
        assert a.shape == b.shape and a.dtype == b.dtype, k
        if exact:
            np.testing.assert_array_equal(a, b, err_msg=k)
        else:
            assert np.max(np.abs(a.astype(np.float64) - b)) <= 1e-6 * float(np.max(np.abs(a))), k


@pytest.mark.parametrize("impl", ["torch", "jax"])
@pytest.mark.parametrize("fmt", ["npz", "bf16 npz", "safetensors", "orbax"])
def test_streamed_generate_equals_resident_every_format(files, fmt, impl):
    kw = {"ignore_eos": True}
    _same(_generate(files[fmt], impl, None, **kw), _generate(files[fmt], impl, True, **kw), exact=impl == "torch")


@pytest.mark.parametrize("impl", ["torch", "jax"])
def test_sampled_stopped_and_forced_decoding_equal_resident(impl):
    """PaliGemma 1 (MQA, no softcap): sampling draws the resident decode's random numbers (same tokens); a row
    stops at <eos> as resident (tokens 0 after it, the steps that ran); forced tokens are fed the same way."""
    sampled = {"greedy": False, "temperature": 4.0, "top_k": 50, "seed": 5, "ignore_eos": True}
    res = _generate(PG1, impl, None, **sampled)
    assert len(set(res["tokens"][0].tolist())) > 2  # a real draw, not a peaked distribution's argmax
    _same(res, _generate(PG1, impl, True, **sampled), exact=impl == "torch")
    greedy = _generate(PG1, impl, None, ignore_eos=True)["tokens"]
    eos = int(greedy[0, 1])  # row 0 emits it at step 1: rows stop there (or run on when the other row does not)
    stopped = _generate(PG1, impl, None, eos_id=eos)
    assert stopped["logits"].shape[1] < STEPS or (stopped["tokens"][0, 2:] == 0).all()
    _same(stopped, _generate(PG1, impl, True, eos_id=eos), exact=impl == "torch")
    forced = np.random.default_rng(0).integers(2, 500, size=greedy.shape)
    kw = {"ignore_eos": True, "forced_tokens": forced}
    _same(_generate(PG1, impl, None, **kw), _generate(PG1, impl, True, **kw), exact=impl == "torch")


def test_bfloat16_streamed_generate_is_bit_exact(files):
    _same(_generate(files["npz"], "torch", None, "bfloat16"), _generate(files["npz"], "torch", True, "bfloat16"), True)


BUNDLES = sorted(f for f in os.listdir(GOLDEN) if f.endswith(".bundle"))


@pytest.mark.parametrize(
    "bundle,impl", [(b, "torch") for b in BUNDLES] + [("tiny-pg2-gqa.bundle", "jax")]
)  # every shipped bundle (transformers and keras-hub expectations) with torch; jax on one (its pg1 run: the CLI test)
def test_golden_check_streamed_passes_the_shipped_bundles(bundle, impl):
    """The forward points and the teacher-forced decoding (step logits, caches) of a shipped bundle, streamed."""
    from parity.config import TINY_VARIANTS

    r = golden.check(os.path.join(GOLDEN, bundle), impl=impl, stream=True)
    assert r, r.first_divergence
    compared = [x for x in r.capture.records if x.stats is not None]
    full = pts.forward_points(TINY_VARIANTS[golden.Bundle.open(os.path.join(GOLDEN, bundle)).manifest["config"]])
    assert len(compared) == len(full) or (bundle.endswith(".keras_hub.bundle") and len(compared) > 5)
    assert r.generation is not None and all(row.first_divergence is None for row in r.generation.rows)
    assert any(x.point.endswith("k_cache") and x.stats.compared > 0 for x in r.generation.records)


def test_golden_check_streamed_fails_a_planted_change_where_resident_does(tmp_path):
    """Layer 1's MLP output projection, one element + 1e-3 (as test_golden's resident check): --stream fails at
    the same first point, exit 1."""
    with np.load(PG1, allow_pickle=False) as z:
        params = {k: z[k] for k in z.files}
    key = "params/llm/layers/mlp/linear"
    params[key] = params[key].copy()
    params[key][1, 5, 7] += 1e-3
    ckpt = str(tmp_path / "tampered.npz")
    np.savez(ckpt, **params)
    bundle = os.path.join(GOLDEN, "tiny-pg1-mqa.bundle")
    res = CliRunner().invoke(main, ["golden", "check", bundle, "--checkpoint", ckpt, "--stream", "--json"])
    assert res.exit_code == 1, res.output
    d = json.loads(res.output)
    assert not d["passed"] and d["first_divergence"] == "llm/layer01/mlp"
    ok = CliRunner().invoke(main, ["golden", "check", bundle, "--stream", "--impl", "jax"])
    assert ok.exit_code == 0, ok.output


def test_cli_generate_stream_says_its_cost_and_what_ran(files, tmp_path):
    helps = {
        cmd: CliRunner().invoke(main, [*cmd, "--help"], terminal_width=200).output
        for cmd in (("generate",), ("compare",), ("golden", "check"))
    }
    flat = {k: " ".join(v.split()) for k, v in helps.items()}
    assert "--stream" in flat[("generate",)] and "every decode step reads every Gemma block" in flat[("generate",)]
    assert "per token" in flat[("generate",)] and "same tokens as resident" in flat[("generate",)]
    assert "With --generate every decode step reads the weights again" in flat[("compare",)]
    assert "--stream" in flat[("golden", "check")]
    out = str(tmp_path / "g.safetensors")
    args = ["generate", files["npz"], "--inputs", INPUTS, "--max-new-tokens", "3", "--ignore-eos"]
    res = CliRunner().invoke(main, [*args, "--stream", "-o", out])
    assert res.exit_code == 0, res.output
    assert "block-streamed" in res.output
    resident = CliRunner().invoke(main, [*args, "--json"])
    rows = json.loads(resident.output)["rows"]
    assert [f"row {r['row']}: {r['tokens']}" for r in rows] == [
        ln for ln in res.output.splitlines() if ln[:4] == "row "
    ]
    cmp = ["compare", files["npz"], "--a", "torch", "--b", "jax", "--inputs", INPUTS, "--generate", "3", "--json"]
    res = CliRunner().invoke(main, [*cmp, "--stream"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert all(d["sides"][s]["manifest"]["execution"] == "streamed" for s in "AB"), d["sides"]


def test_generate_streams_automatically_when_resident_would_not_fit(files, tmp_path, monkeypatch):
    """Under a limit the resident run exceeds but the streamed one fits, generate streams and one line says so;
    the tokens are the resident run's."""
    resident = run.generate(files["npz"], INPUTS, 3, ignore_eos=True)
    monkeypatch.setattr(estimate, "STREAM_BASE", 0.0)  # the tiny model's streamed need: a few MB
    monkeypatch.setenv(estimate.ENV_LIMIT, "100M")  # the resident need: the framework's runtime alone is more
    monkeypatch.delenv(estimate.ENV_CHECK, raising=False)
    said: list[str] = []
    r = run.generate(files["npz"], INPUTS, 3, ignore_eos=True, warn=said.append)
    assert r["manifest"]["execution"] == "streamed" and r["rows"] == resident["rows"]
    assert len(said) == 1 and "\n" not in said[0] and "generate with torch float32 needs" in said[0], said
    assert "running block-streamed instead" in said[0]
