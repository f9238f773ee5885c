"""parity compare --generate N: torch vs jax end to end (CLI, JSON, HTML charts, text); the forced-token decode of
torch, jax and transformers on the same arbitrary tokens; near-ties labelled, not failed; divergences and the cache
slots after them, from hand-made generation files; teacher forcing keeps later steps comparable."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from parity import points, spec
from parity.cli import main
from parity.compare.generation import compare_generation, compare_generation_files, margins
from parity.config import TINY_VARIANTS
from parity.conventions import get_conventions
from parity.inputs import load_inputs
from parity.run import read_capture, write_capture

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(os.path.dirname(HERE), "golden")
INPUTS = os.path.join(GOLDEN, "tiny-inputs.npz")
PG1 = os.path.join(GOLDEN, "tiny-pg1-mqa.npz")
GQA = TINY_VARIANTS["tiny-pg2-gqa"]


def test_cli_torch_vs_jax_same_tokens_caches_and_charts(tmp_path):
    page = tmp_path / "gen.html"
    res = CliRunner().invoke(
        main,
        [
            "compare",
            PG1,
            "--a",
            "torch",
            "--b",
            "jax",
            "--inputs",
            INPUTS,
            "--generate",
            "4",
            "--tokenizer",
            os.path.join(GOLDEN, "tokenizer.model"),
            "--html",
            str(page),
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["schema"] == "parity.compare.generate/1" and d["passed"] and d["first_divergence"] is None
    assert d["steps"] == 4 and d["profile"] == "fp32" and not d["teacher_forced"]
    for row in d["rows"]:
        assert row["first_divergence"] is None and row["tokens_a"] == row["tokens_b"] and row["text_a"]
        assert len(row["steps"]) == 4
        for s in row["steps"]:
            assert s["margin_a"] > 0 and s["kl"] < 1e-9 and s["top5"] == 1.0 and s["comparable"]
    names = [p["point"] for p in d["points"]]
    assert names == ["decode/logits"] + list(points.cache_points(TINY_VARIANTS["tiny-pg1-mqa"]))
    assert all(p["judgement"]["passed"] for p in d["points"])
    html = page.read_text()
    assert html.count('<svg class="steps"') == 2 and 'data-series="KL(A‖B)"' in html
    assert 'data-series="margin A"' in html and 'data-series="near-tie"' in html


def test_forced_tokens_give_the_same_step_logits_in_torch_jax_and_transformers():
    """The same arbitrary tokens fed to three independent decoders (window 8 < the sequence)."""
    from parity import hf_side
    from parity.jax_impl import api as jax_api
    from parity.torch_impl import api as torch_api

    params = spec.random_params(GQA, seed=5)
    conv = get_conventions("transformers")
    batch = load_inputs(INPUTS, GQA)
    forced = np.random.default_rng(0).integers(3, GQA.text.vocab_size, (2, 6)).astype(np.int32)
    cache = list(points.cache_points(GQA))
    runs = {}
    for name, api in (("torch", torch_api), ("jax", jax_api), ("transformers", hf_side)):
        m = api.build_model(GQA, conv, params=params)
        runs[name] = api.generate(m, batch, 6, return_logits=True, ignore_eos=True, forced_tokens=forced, capture=cache)
    ref = runs["transformers"]
    p = GQA.num_image_tokens + batch["text"].shape[1]
    for name in ("torch", "jax"):
        g = runs[name]
        rel = np.abs(g["logits"] - ref["logits"]).max() / np.abs(ref["logits"]).max()
        assert rel < 1e-5, (name, rel)
        assert (g["tokens"] == ref["logits"].argmax(-1)).all()  # the picks, not the forced tokens
        for r in range(2):  # the fed tokens' cache slots
            n = GQA.num_image_tokens + int(batch["mask_input"][r].sum())
            for k in cache:
                for lo, hi, lo2 in ((0, n, 0), (p, p + 5, p)):
                    # relative to the tensor's scale, like the logits: float32 rounding in three decoders grows
                    # with depth and with the values' magnitude (layer 2 here: |err| 1.6e-5 on values up to 7.5,
                    # which an element-wise atol of 1e-5 flagged on some CPUs); a wrong slot or mask is O(1)
                    a, b = g[k][r, lo:hi], ref[k][r, lo2 : lo2 + hi - lo]
                    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), (name, k, r, lo)
    free = torch_api.generate(
        torch_api.build_model(GQA, conv, params=params), batch, 6, return_logits=True, ignore_eos=True
    )
    own = torch_api.generate(
        torch_api.build_model(GQA, conv, params=params),
        batch,
        6,
        return_logits=True,
        ignore_eos=True,
        forced_tokens=free["tokens"],
    )
    assert (own["logits"] == free["logits"]).all()


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """A real torch generation file (tiny-pg1-mqa, 5 steps) to edit by hand."""
    from parity import golden

    d = tmp_path_factory.mktemp("gen")
    _, gen, _ = golden.run_expectation(PG1, INPUTS, "torch", "big_vision", str(d), "a", steps=5)
    return read_capture(gen)


def _pair(tmp_path, generated, edit):
    tensors, manifest = generated
    b = {k: v.copy() for k, v in tensors.items()}
    edit(b)
    pa, pb = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    write_capture(pa, tensors, manifest, True)
    write_capture(pb, b, manifest, True)
    return pa, pb


def test_a_divergence_at_a_near_tie_is_labelled_not_failed(tmp_path, generated):
    tensors, _ = generated
    lg = tensors["logits"][0, 2]
    top1, top2 = np.argsort(-lg)[:2]

    def near(b):  # A's own margin made 1e-5 (below the fp32 logit tolerance), B's two best swapped by 2e-5
        a_logits = tensors["logits"]
        a_logits[0, 2, top2] = a_logits[0, 2, top1] - 1e-5
        b["logits"][0, 2, top2] = a_logits[0, 2, top1] + 1e-5
        b["tokens"][0, 2:] = [top2, 7, 7]

    pa, pb = _pair(tmp_path, generated, near)
    c = compare_generation_files(pa, pb)
    row = c.rows[0]
    assert row.first_divergence == 2 and row.divergences[0].near_tie and row.passed
    assert [s.comparable for s in row.steps] == [True, True, True, False, False]
    assert c and c.exit_code == 0 and c.rows[1].first_divergence is None
    assert row.to_dict()["first_divergence_near_tie"] is True
    s = row.steps[2]
    assert s.margin_a == pytest.approx(1e-5, rel=0.1) and s.near_tie_below == pytest.approx(
        1e-4 * np.abs(tensors["logits"][0, 2]).max()
    )


def test_a_clear_divergence_fails_and_cache_slots_after_it_are_not_compared(tmp_path, generated):
    tensors, manifest = generated
    p = GQA.num_image_tokens + manifest["inputs"]["shapes"]["text"][1]
    k0 = points.llm_k_cache(0)
    assert margins(tensors["logits"][0, 1]) > 1e-2  # a clear winner at step 1

    def clear(b):
        b["tokens"][0, 1] = (tensors["tokens"][0, 1] + 1) % 512
        b[k0][0, p + 1 :] += 100.0  # slots of token 1 onwards: different histories, not compared

    c = compare_generation_files(*_pair(tmp_path, generated, clear))
    assert not c and c.exit_code == 1 and c.first_divergence == "row 0 step 1"
    assert not c.rows[0].divergences[0].near_tie
    assert all(r.passed for r in c.records)  # step logits identical, cache differences only after the divergence

    def early(b):
        b["tokens"][0, 1] = (tensors["tokens"][0, 1] + 1) % 512
        b[k0][0, p] += 100.0  # token 0's slot: the same history on both sides

    c = compare_generation_files(*_pair(tmp_path, generated, early))
    assert [r.point for r in c.records if not r.passed] == [k0]


def test_teacher_forcing_keeps_later_steps_comparable(tmp_path):
    other = str(tmp_path / "other.npz")
    cfg = TINY_VARIANTS["tiny-pg1-mqa"]
    np.savez(other, **{spec.NPZ_PREFIX + k: v for k, v in spec.random_params(cfg, seed=9).items()})
    free = compare_generation(ckpt=PG1, against=other, inputs=INPUTS, steps=4, isolate=False)
    tf = compare_generation(ckpt=PG1, against=other, inputs=INPUTS, steps=4, teacher_forced=True, isolate=False)
    assert not free and not tf
    first = [r.first_divergence for r in free.rows]
    assert all(f is not None for f in first) and free.notes
    for r, f in zip(free.rows, first):
        assert all(not s.comparable for s in r.steps[f + 1 :])
    assert all(s.comparable for r in tf.rows for s in r.steps)
    assert tf.records[0].stats.compared == 2 * 4 * cfg.text.vocab_size  # every step's logits judged
    assert [s.token_a for s in tf.rows[0].steps] == [s.token_a for s in free.rows[0].steps]  # A runs free


def test_generate_refuses_layer_options_and_capture_file_b_when_teacher_forced(tmp_path, generated):
    res = CliRunner().invoke(
        main, ["compare", PG1, "--a", "torch", "--b", "jax", "--inputs", INPUTS, "--generate", "2", "--layer-by-layer"]
    )
    assert res.exit_code == 2 and "--generate" in res.output
    pa, pb = _pair(tmp_path, generated, lambda b: None)
    res = CliRunner().invoke(main, ["compare", "--a", pa, "--b", pb, "--generate", "5", "--teacher-forced"])
    assert res.exit_code == 2 and "side B must be an implementation" in res.output
    res = CliRunner().invoke(main, ["compare", "--a", pa, "--b", pb, "--generate", "5"])
    assert res.exit_code == 0, res.output


def test_runs_of_different_lengths_are_compared_over_their_common_steps(tmp_path, generated):
    tensors, manifest = generated
    pa, pb = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    write_capture(pa, tensors, manifest, True)
    write_capture(pb, {**tensors, "logits": tensors["logits"][:, :3]}, manifest, True)  # every row stopped at <eos>
    c = compare_generation_files(pa, pb)
    assert c and [len(r.steps) for r in c.rows] == [3, 3] and "first 3 compared" in c.notes[0]


def test_cache_prompt_slots_come_from_the_given_inputs_when_the_recorded_path_is_gone(tmp_path, generated):
    """A generation file moved to another machine (a golden bundle in a fresh clone): the inputs path in its manifest
    no longer exists, so the padding slots of the prompt are known only from the inputs given; without them every
    slot is compared and a note says so."""
    tensors, manifest = generated
    cfg = TINY_VARIANTS["tiny-pg1-mqa"]
    real = load_inputs(INPUTS, cfg)["mask_input"].sum(1)
    short = int(np.argmin(real))
    assert real[short] < manifest["inputs"]["shapes"]["text"][1]  # a padded row
    pad = cfg.num_image_tokens + int(real[short])
    k0 = points.llm_k_cache(0)
    gone = {**manifest, "inputs": {**manifest["inputs"], "path": str(tmp_path / "moved-away.npz")}}

    def edit(b):
        b[k0][short, pad] += 100.0  # a padding slot: never attended, so never compared

    a, b = {k: v.copy() for k, v in tensors.items()}, {k: v.copy() for k, v in tensors.items()}
    edit(b)
    pa, pb = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    write_capture(pa, a, gone, True)
    write_capture(pb, b, gone, True)
    c = compare_generation_files(pa, pb, inputs=INPUTS)
    assert c and not any("KV cache prompt slots" in n for n in c.notes)
    c = compare_generation_files(pa, pb)
    assert [r.point for r in c.records if not r.passed] == [k0]
    assert any("KV cache prompt slots: all positions (inputs file not available" in n for n in c.notes)
