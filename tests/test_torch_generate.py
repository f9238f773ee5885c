"""Static-KV-cache generation: greedy against transformers' generate, decode vs full forward, sampling, EOS."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
from hf_oracle import hf_generate_row, hf_model, rel_err
from torch_fixtures import make_inputs

from parity import points, spec
from parity.config import TINY_VARIANTS
from parity.conventions import PRESETS
from parity.torch_impl import api, build_model

gen_mod = importlib.import_module("parity.torch_impl.generate")

TOL = 1e-5
NEW = 32


@pytest.fixture(scope="module", params=list(TINY_VARIANTS))
def case(request):
    cfg = TINY_VARIANTS[request.param]
    params = spec.random_params(cfg, seed=2)
    return cfg, params, make_inputs(cfg, seed=3), build_model(cfg, PRESETS["transformers"], params=params)


def test_greedy_matches_transformers(case):
    cfg, params, inputs, ours = case
    got = api.generate(ours, inputs, NEW, return_logits=True)
    assert got["tokens"].shape == (3, NEW) and got["decode_path"] == "eager"
    hf = hf_model(cfg, params)
    for row in range(3):  # transformers pads on the left: compare row by row, each unpadded
        tokens, logits = hf_generate_row(hf, cfg, inputs, row, NEW)
        n = len(tokens)
        np.testing.assert_array_equal(got["tokens"][row, :n], tokens)
        assert rel_err(got["logits"][row, :n], logits) <= TOL


@pytest.mark.parametrize("preset", ["transformers", "big_vision"])
def test_incremental_decode_equals_full_forward(case, preset):
    """Prefill + decode steps reproduce the full-forward logits of prompt + generated tokens (per row)."""
    cfg, params, inputs, _ = case
    conv = PRESETS[preset]
    model = build_model(cfg, conv, params=params)
    got = api.generate(model, inputs, 12, return_logits=True)
    cap = cfg.text.final_softcap
    for row in range(3):
        n = int(inputs["mask_input"][row].sum())
        new = got["tokens"][row]
        k = len(new) if 1 not in new else int(np.argmax(new == 1)) + 1
        one = dict(
            image=inputs["image"][row : row + 1],
            text=np.concatenate([inputs["text"][row, :n], new[: k - 1]])[None],
            mask_ar=np.concatenate([inputs["mask_ar"][row, :n], np.ones(k - 1, np.int32)])[None],
        )
        full = api.forward(model, one)[points.LOGITS][0, cfg.num_image_tokens + n - 1 :]
        assert full.shape[0] == k
        steps = got["logits"][row, :k]
        if conv.final_softcap == "decode_only" and cap:  # forward and first token uncapped, later steps capped
            full = np.concatenate([full[:1], cap * np.tanh(full[1:] / cap)])
        assert rel_err(steps, full) <= TOL


def test_top_k_1_is_greedy_and_sampling_is_seeded(case):
    cfg, _, inputs, model = case
    greedy = api.generate(model, inputs, 10)["tokens"]
    np.testing.assert_array_equal(api.generate(model, inputs, 10, greedy=False, top_k=1, seed=5)["tokens"], greedy)
    np.testing.assert_array_equal(api.generate(model, inputs, 10, greedy=False, top_p=1e-6, seed=5)["tokens"], greedy)
    a = api.generate(model, inputs, 10, greedy=False, temperature=2.0, top_k=50, top_p=0.95, seed=7)["tokens"]
    b = api.generate(model, inputs, 10, greedy=False, temperature=2.0, top_k=50, top_p=0.95, seed=7)["tokens"]
    c = api.generate(model, inputs, 10, greedy=False, temperature=2.0, seed=8)["tokens"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_eos_stops_a_row_and_pads_with_zero(case):
    cfg, _, inputs, model = case
    greedy = api.generate(model, inputs, 8)["tokens"]
    eos = int(greedy[0, 2])
    got = api.generate(model, inputs, 8, eos_id=eos)["tokens"]
    first = int(np.argmax(greedy[0] == eos))
    np.testing.assert_array_equal(got[0, : first + 1], greedy[0, : first + 1])
    assert (got[0, first + 1 :] == 0).all()
    for row in (1, 2):
        stop = np.flatnonzero(greedy[row] == eos)
        end = stop[0] + 1 if len(stop) else 8
        np.testing.assert_array_equal(got[row, :end], greedy[row, :end])


def test_kv_cache_is_capturable(case):
    cfg, _, inputs, model = case
    names = points.cache_points(cfg)
    got = api.generate(model, inputs, 4, capture=names)
    t = cfg.text
    size = cfg.num_image_tokens + inputs["text"].shape[1] + 4
    for name in names:
        assert got[name].shape == (3, size, t.num_kv_heads, t.head_dim)
    k0 = got[points.llm_k_cache(0)]
    n = int(inputs["mask_input"][1].sum())
    assert np.abs(k0[1, : cfg.num_image_tokens + n]).min(axis=(1, 2)).max() > 0  # prompt written
    assert (k0[1, -1] == 0).all()  # the last slot is never written with 4 new tokens


def test_compile_failure_falls_back_to_eager(case, monkeypatch):
    cfg, _, inputs, model = case

    def broken(mode):
        def step(*a):
            raise RuntimeError("no compiler here")

        return step

    monkeypatch.setattr(gen_mod, "compiled_decode_step", broken)
    got = api.generate(model, inputs, 6, compile="reduce-overhead")
    assert got["decode_path"].startswith("eager (compile reduce-overhead failed")
    np.testing.assert_array_equal(got["tokens"], api.generate(model, inputs, 6)["tokens"])


def test_benchmark_cpu_path_runs():
    """benchmarks/torch_forward.py shares its code path with --device cuda; run it on a tiny config."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "torch_forward.py"
    spec_ = importlib.util.spec_from_file_location("torch_forward_bench", path)
    bench = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(bench)
    res = bench.bench("cpu", new_tokens=3, batches=[2], repeat=1, cfg=TINY_VARIANTS["tiny-pg2-gqa"])
    row = res["rows"][0]
    assert row["tokens_agree"] and row["decode_path"] == "eager" and row["prefill_ratio"]["median"] > 0
    assert row["prefill_ratio"]["verdict"] in ("faster", "slower", "inconclusive")
    assert "tok/s" in bench.table(res) and "nan" not in bench.table(res).lower()
    json.dumps(res, allow_nan=False)  # never nan
