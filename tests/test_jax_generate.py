"""JAX generation (jitted prefill + lax.while_loop decode): greedy against transformers' generate with
eos_token_id=None, token streams, per-step logits and KV caches against torch under both presets, EOS, ignore_eos,
sampling; sharding on 8 host devices (subprocess); the benchmark's CPU path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hf_oracle import hf_generate_row, hf_model, rel_err
from torch_fixtures import make_inputs

from parity import points, spec
from parity.config import TINY_VARIANTS
from parity.conventions import PRESETS
from parity.jax_impl import api
from parity.torch_impl import api as torch_api

TOL = 1e-5
NEW = 32
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=list(TINY_VARIANTS))
def case(request):
    cfg = TINY_VARIANTS[request.param]
    params = spec.random_params(cfg, seed=2)
    models = {
        p: (api.build_model(cfg, c, params=params), torch_api.build_model(cfg, c, params=params))
        for p, c in PRESETS.items()
    }
    return cfg, params, make_inputs(cfg, seed=3), models


def test_greedy_matches_transformers_for_32_steps(case):
    """ignore_eos with an <eos> that does occur: the whole stream equals transformers' with eos_token_id=None."""
    cfg, params, inputs, models = case
    ours = models["transformers"][0]
    hf = hf_model(cfg, params)
    streams = [hf_generate_row(hf, cfg, inputs, row, NEW, eos_token_id=None) for row in range(3)]
    eos = int(streams[0][0][2])  # a token row 0 emits early: without ignore_eos it would stop there
    got = api.generate(ours, inputs, NEW, return_logits=True, eos_id=eos, ignore_eos=True)
    assert got["tokens"].shape == (3, NEW) and got["logits"].shape == (3, NEW, cfg.text.vocab_size)
    assert got["decode_path"].startswith("compiled")
    for row, (tokens, logits) in enumerate(streams):  # transformers pads on the left: row by row, unpadded
        assert len(tokens) == NEW
        np.testing.assert_array_equal(got["tokens"][row], tokens)
        assert rel_err(got["logits"][row], logits) <= TOL
    # torch's ignore_eos gives the same stream
    torch_got = torch_api.generate(models["transformers"][1], inputs, NEW, eos_id=eos, ignore_eos=True)
    np.testing.assert_array_equal(torch_got["tokens"], got["tokens"])


@pytest.mark.parametrize("preset", list(PRESETS))
def test_generation_matches_torch(case, preset):
    """Tokens, per-step logits (incl. big_vision's decode-only softcap) and every KV-cache slot equal torch's."""
    cfg, _, inputs, models = case
    ours, theirs = models[preset]
    names = points.cache_points(cfg)
    got = api.generate(ours, inputs, 12, return_logits=True, capture=names + [points.LOGITS])
    want = torch_api.generate(theirs, inputs, 12, return_logits=True, capture=names + [points.LOGITS])
    np.testing.assert_array_equal(got["tokens"], want["tokens"])
    assert got["logits"].shape == want["logits"].shape
    for name in ["logits"] + names + [points.LOGITS]:  # "logits": steps; points.LOGITS: the prefill
        assert got[name].shape == want[name].shape, name
        assert rel_err(got[name], want[name]) <= TOL, (name, rel_err(got[name], want[name]))
    t = cfg.text
    assert got[names[0]].shape == (3, cfg.num_image_tokens + inputs["text"].shape[1] + 12, t.num_kv_heads, t.head_dim)


def test_eos_stops_rows_and_pads_with_zero_like_torch(case):
    cfg, _, inputs, models = case
    ours, theirs = models["big_vision"]
    kw = dict(return_logits=True, capture=[points.LOGITS])  # as test_generation_matches_torch: compiled once
    greedy = api.generate(ours, inputs, 12, **kw)["tokens"]
    eos = int(greedy[0, 2])
    got = api.generate(ours, inputs, 12, eos_id=eos, **kw)["tokens"]
    np.testing.assert_array_equal(got, torch_api.generate(theirs, inputs, 12, eos_id=eos)["tokens"])
    first = int(np.argmax(greedy[0] == eos))
    np.testing.assert_array_equal(got[0, : first + 1], greedy[0, : first + 1])
    assert (got[0, first + 1 :] == 0).all()
    kept = api.generate(ours, inputs, 12, eos_id=eos, ignore_eos=True, **kw)["tokens"]
    np.testing.assert_array_equal(kept, greedy)  # ignore_eos: the stream runs on through <eos>


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    cfg = TINY_VARIANTS["tiny-pg2-gqa"]
    model = api.build_model(cfg, PRESETS["transformers"], params=spec.random_params(cfg, seed=2))
    inputs = make_inputs(cfg, seed=3)
    greedy = api.generate(model, inputs, 10)["tokens"]
    np.testing.assert_array_equal(api.generate(model, inputs, 10, greedy=False, top_k=1, seed=5)["tokens"], greedy)
    np.testing.assert_array_equal(api.generate(model, inputs, 10, greedy=False, top_p=1e-6, seed=5)["tokens"], greedy)
    kw = dict(greedy=False, temperature=5.0, top_k=3, top_p=0.95, return_logits=True, ignore_eos=True)
    a = api.generate(model, inputs, 10, seed=7, **kw)
    np.testing.assert_array_equal(a["tokens"], api.generate(model, inputs, 10, seed=7, **kw)["tokens"])
    assert not np.array_equal(a["tokens"], api.generate(model, inputs, 10, seed=8, **kw)["tokens"])
    assert not np.array_equal(a["tokens"], greedy)
    # top-k 3: every sampled token is among the 3 most likely of its step (the logits of the stream itself)
    top3 = np.argsort(-a["logits"], axis=-1)[..., :3]
    assert all(a["tokens"][r, s] in top3[r, s] for r in range(3) for s in range(10))
    with pytest.raises(ValueError, match="not produced"):
        api.generate(model, inputs, 2, capture=["llm/nothing"])


_MESH_SCRIPT = r"""
import json, sys
import numpy as np
import jax
from jax.sharding import PartitionSpec as P
sys.path.insert(0, "tests")
from torch_fixtures import make_inputs
from parity import points, spec
from parity.config import TINY_VARIANTS
from parity.conventions import PRESETS
from parity.jax_impl import api

assert len(jax.devices("cpu")) == 8
cfg = TINY_VARIANTS["tiny-pg2-gqa"]
# Sharding splits contractions (fsdp over D, tensor parallel over N/F/V): float32 sums in another order. Weights of
# scale 0.1 (trained Gemma weights are smaller still) keep that rounding near 5e-7; scale 0.3 amplifies it to 2e-6.
params = spec.random_params(cfg, seed=1, scale=0.1)
inputs = make_inputs(cfg, length=(14, 10, 12, 9, 14, 11, 13, 8), prefix=(3, 6, 9, 2, 5, 4, 7, 1))
conv = PRESETS["transformers"]
ref = api.forward(api.build_model(cfg, conv, params=params), inputs)[points.LOGITS]


def _spec(v) -> list:
    # a sharded array's partition spec, one entry per axis (None where unsharded), as strings
    spec = [a if a is None else str(a) for a in v.sharding.spec]
    return spec + [None] * (v.ndim - len(spec))


# decoding: one mesh (compile time)
ref_gen = api.generate(api.build_model(cfg, conv, params=params), inputs, 6)["tokens"]

report = {}
for mesh in ("data=2,model=4", "data=8", "model=8"):
    m = api.build_model(cfg, conv, params=params, mesh=mesh)
    got = api.forward(m, inputs)[points.LOGITS]
    leaves = {"llm/layers/attn/q_einsum/w": m.module.llm.layers.attn.q_einsum.w,
              "llm/layers/attn/kv_einsum/w": m.module.llm.layers.attn.kv_einsum.w,
              "llm/layers/mlp/gating_einsum": m.module.llm.layers.mlp.gating_einsum,
              "llm/embedder/input_embedding": m.module.llm.embedder.input_embedding,
              "llm/final_norm/scale": m.module.llm.final_norm.scale,
              "img/head/kernel": m.module.img.head.kernel,
              "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel":
                  m.module.img.Transformer.encoderblock.MultiHeadDotProductAttention_0.query.kernel}
    report[mesh] = {
        "rel": float(np.abs(got - ref).max() / np.abs(ref).max()),
        "tokens_equal": mesh != "data=2,model=4" or bool((api.generate(m, inputs, 6)["tokens"] == ref_gen).all()),
        "specs": {k: _spec(v[...]) for k, v in leaves.items()},
        "shard_shape": list(m.module.llm.layers.mlp.gating_einsum[...].addressable_shards[0].data.shape),
        "devices": len(m.module.llm.embedder.input_embedding[...].sharding.device_set),
        "image_spec": [a if a is None else str(a) for a in m.put(inputs["image"]).sharding.spec],
    }
print(json.dumps(report))
"""


def test_mesh_sharding_on_8_host_devices():
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    r = subprocess.run(
        [sys.executable, "-c", _MESH_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    for mesh, row in rep.items():
        assert row["rel"] <= 1e-6 and row["tokens_equal"], (mesh, row)
        assert row["devices"] == 8
    # tiny-pg2-gqa: L=3, N=4, K=2, D=48, F=96, V=512, Dv=32, Nv=4. Width letters go to "data" (fsdp), heads /
    # mlp / vocabulary to "model"; a size the axis does not divide stays replicated; depth is never sharded.
    want = {
        "data=2,model=4": {
            "llm/layers/attn/q_einsum/w": [None, "model", "data", None],
            "llm/layers/attn/kv_einsum/w": [None, None, None, "data", None],  # K = 2 on model = 4: replicated
            "llm/layers/mlp/gating_einsum": [None, None, "data", "model"],
            "llm/embedder/input_embedding": ["model", "data"],
            "llm/final_norm/scale": ["data"],
            "img/head/kernel": ["data", None],  # Dv and D both map to data: the first wins
            "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel": [None, "data", "model", None],
        },
        "data=8": {
            "llm/layers/attn/q_einsum/w": [None, None, "data", None],
            "llm/layers/attn/kv_einsum/w": [None, None, None, "data", None],
            "llm/layers/mlp/gating_einsum": [None, None, "data", None],
            "llm/embedder/input_embedding": [None, "data"],
            "llm/final_norm/scale": ["data"],
            "img/head/kernel": ["data", None],
            "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel": [None, "data", None, None],
        },
        "model=8": {
            "llm/layers/attn/q_einsum/w": [None, None, None, None],  # N = 4 on model = 8: replicated
            "llm/layers/attn/kv_einsum/w": [None, None, None, None, None],
            "llm/layers/mlp/gating_einsum": [None, None, None, "model"],
            "llm/embedder/input_embedding": ["model", None],
            "llm/final_norm/scale": [None],
            "img/head/kernel": [None, None],
            "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel": [None, None, None, None],
        },
    }
    for mesh, specs in want.items():
        assert rep[mesh]["specs"] == specs, mesh
    assert rep["data=2,model=4"]["shard_shape"] == [3, 2, 24, 24]
    assert rep["data=2,model=4"]["image_spec"][0] == "data" and rep["model=8"]["image_spec"][0] is None


def test_benchmark_cpu_path_runs():
    """benchmarks/jax_forward.py shares its code path with --device gpu; run it on a tiny config."""
    import importlib.util

    path = ROOT / "benchmarks" / "jax_forward.py"
    spec_ = importlib.util.spec_from_file_location("jax_forward_bench", path)
    bench = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(bench)
    res = bench.bench("cpu", new_tokens=3, batches=[2], repeat=1, cfg=TINY_VARIANTS["tiny-pg2-gqa"])
    row = res["rows"][0]
    assert row["tokens_agree"] and row["prefill_ratio"] > 0 and row["compile_jax_s"] > 0
    assert "tok/s" in bench.table(res)
