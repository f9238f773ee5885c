"""float64 as ground truth (issue 25 §2): torch and jax computing in float64 agree to <= 1e-10 on every point of the
tiny configs under both presets (an independent computation each: the two ports); a 1e-6 relative change planted in
one LLM block is invisible under fp32 yet fails under the fp64 profile with the first divergence in that block;
`compare --truth` names the side that drifts from a float64 run; a float64 capture holds float64 points; jax float64
never runs in this (float32) process: it is refused here and isolated in a process of its own by the pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from torch_fixtures import make_inputs

from parity import spec
from parity.capture_file import read_capture
from parity.cli import main
from parity.compare import compare
from parity.compare.html import render_html
from parity.config import TINY_VARIANTS
from parity.conventions import get_conventions
from parity.errors import ConfigError
from parity.inputs import save_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = ("big_vision", "transformers")
GQA = "tiny-pg2-gqa"
BLOCK = 1  # the LLM block whose gating_einsum gets the planted change


def _save(params: dict[str, np.ndarray], path) -> str:
    np.savez(path, **{spec.NPZ_PREFIX + k: v for k, v in params.items()})
    return str(path)


def planted(params: dict[str, np.ndarray], rel: float) -> dict[str, np.ndarray]:
    """A copy with the largest weight of LLM block BLOCK's gating_einsum multiplied by (1 + rel) in float32."""
    out = dict(params)
    w = params["llm/layers/mlp/gating_einsum"].copy()
    i = np.unravel_index(np.abs(w[BLOCK]).argmax(), w[BLOCK].shape)
    w[BLOCK][i] *= np.float32(1 + rel)
    assert w[BLOCK][i] != params["llm/layers/mlp/gating_einsum"][BLOCK][i]  # the change survives float32
    out["llm/layers/mlp/gating_einsum"] = w
    return out


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp64")
    cfg = TINY_VARIANTS[GQA]
    params = spec.random_params(cfg, seed=3)
    return {
        "dir": d,
        "a": _save(params, d / "a.npz"),
        "b_1e-6": _save(planted(params, 1e-6), d / "b6.npz"),
        "b_1e-2": _save(planted(params, 1e-2), d / "b2.npz"),
        "inputs": str(save_inputs(d / "in.npz", make_inputs(cfg))),
    }


# jax in float64 for every tiny config and preset, in ONE process of its own (x64 from its start): the points as npz
JAX_F64 = """
import sys, numpy as np
from parity import points
from parity.jax_impl import api
from parity.config import TINY_VARIANTS
from parity.conventions import get_conventions
d = sys.argv[1]
for name, cfg in TINY_VARIANTS.items():
    params = dict(np.load(f"{d}/{name}.params.npz"))
    inputs = dict(np.load(f"{d}/{name}.inputs.npz"))
    for preset in sys.argv[2:]:
        m = api.build_model(cfg, get_conventions(preset), dtype="float64", params=params)
        np.savez(f"{d}/{name}.{preset}.jax.npz", **api.forward(m, inputs, points.forward_points(cfg)))
"""


def test_float64_torch_and_jax_agree_to_1e_10_on_every_point_of_the_tiny_configs(tmp_path):
    from parity import points as pts
    from parity.torch_impl import api as torch_api

    for name, cfg in TINY_VARIANTS.items():
        np.savez(tmp_path / f"{name}.params.npz", **spec.random_params(cfg, seed=5))
        np.savez(tmp_path / f"{name}.inputs.npz", **make_inputs(cfg, seed=1))
    env = {**os.environ, "JAX_ENABLE_X64": "1", "PYTHONPATH": ROOT}
    p = subprocess.run(
        [sys.executable, "-c", JAX_F64, str(tmp_path), *PRESETS], capture_output=True, text=True, env=env
    )
    assert p.returncode == 0, p.stderr[-2000:]
    worst = {}
    for name, cfg in TINY_VARIANTS.items():
        params = dict(np.load(tmp_path / f"{name}.params.npz"))
        inputs = dict(np.load(tmp_path / f"{name}.inputs.npz"))
        for preset in PRESETS:
            model = torch_api.build_model(cfg, get_conventions(preset), dtype="float64", params=params)
            t = torch_api.forward(model, inputs, pts.forward_points(cfg))
            j = dict(np.load(tmp_path / f"{name}.{preset}.jax.npz"))
            assert set(j) == set(t) == set(pts.forward_points(cfg))
            for point, a in t.items():
                assert a.dtype == np.float64 and j[point].dtype == np.float64, (name, preset, point)
                rel = float(np.abs(j[point] - a).max() / np.abs(a).max())
                worst[(name, preset, point)] = rel
    assert max(worst.values()) <= 1e-10, sorted(worst.items(), key=lambda kv: -kv[1])[:3]
    # and float64 is really float64: float32 rounding alone would leave ~1e-7 between the ports
    assert max(worst.values()) < 1e-12


def test_jax_float64_is_refused_in_a_float32_process_with_one_line():
    import jax

    from parity.jax_impl import api

    assert not jax.config.jax_enable_x64  # the test process runs float32 jax work: x64 is never flipped here
    with pytest.raises(ConfigError, match="jax float64 needs x64 mode, which is process-wide"):
        api.build_model(TINY_VARIANTS[GQA], get_conventions("big_vision"), dtype="float64")
    assert api.own_process("float64") == {"JAX_ENABLE_X64": "1"} and api.own_process("float32") is None


def test_float64_captures_hold_float64_points_and_jax_runs_in_its_own_process(gqa):
    import jax

    out = {}
    for impl in ("torch", "jax"):
        out[impl] = str(gqa["dir"] / f"{impl}64.safetensors")
        r = CliRunner().invoke(
            main,
            ["capture", gqa["a"], "--inputs", gqa["inputs"], "--impl", impl, "--dtype", "float64", "-o", out[impl]],
        )
        assert r.exit_code == 0, r.output
    assert not jax.config.jax_enable_x64  # the jax capture ran elsewhere
    (t, mt), (j, mj) = read_capture(out["torch"]), read_capture(out["jax"])
    assert mt["compute_dtype"] == mj["compute_dtype"] == "float64"
    assert {v.dtype for v in t.values()} == {v.dtype for v in j.values()} == {np.dtype(np.float64)}
    assert {v["dtype"] for v in mj["tensors"].values()} == {"float64"}
    with open(out["jax"], "rb") as f:  # the safetensors header names F64
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F64"}
    for k in t:
        assert np.abs(j[k] - t[k]).max() <= 1e-10 * np.abs(t[k]).max(), k


def test_a_1e_6_change_in_one_block_passes_fp32_and_fails_fp64_in_that_block(gqa):
    run = dict(ckpt=gqa["a"], against=gqa["b_1e-6"], inputs=gqa["inputs"], layer_by_layer=True, isolate=False)
    c32 = compare("torch:cpu:float32", "torch:cpu:float32", **run)
    c64 = compare("torch:cpu:float64", "torch:cpu:float64", **run)
    assert c32.tolerances.profile == "fp32" and c64.tolerances.profile == "fp64"
    assert c32 and c32.exit_code == 0  # invisible under float32: inside its rounding
    assert not c64 and c64.exit_code == 1
    assert c64.first_divergence == f"llm/layer{BLOCK:02d}/mlp"
    names = [r.point for r in c64.records]  # forward order
    before = c64.records[: names.index(f"llm/layer{BLOCK:02d}/attn")]
    assert before and all(r.stats.max_rel == 0 for r in before)  # the same weights up to the planted block


def test_truth_names_the_side_that_drifts(gqa):
    c = compare(
        "torch",
        "torch",
        ckpt=gqa["a"],
        against=gqa["b_1e-2"],
        inputs=gqa["inputs"],
        layer_by_layer=True,
        isolate=False,
        truth=True,
    )
    o = c.truth_summary()
    assert o["drifts"] == "B" and o["b_max_rel"] > 100 * o["a_max_rel"]
    assert o["words"].startswith("B drifts: ") and "from float64, A " in o["words"]
    by = {r.point: r for r in c.records}
    assert by["img/block00/out"].truth.drifts is None  # before the change both sit at float32 rounding alike
    assert by[f"llm/layer{BLOCK:02d}/mlp"].truth.drifts == "B"
    d = c.to_dict()
    assert d["truth"]["side"] == "torch:cpu:float64" and d["truth"]["drifts"] == "B"
    assert d["points"][-1]["truth"]["drifts"] == "B"
    html = render_html(c)
    assert "id='truth'" in html and "B drifts" in html


def test_truth_needs_an_implementation_as_side_a(gqa, tmp_path):
    cap = str(tmp_path / "a.safetensors")
    r = CliRunner().invoke(main, ["capture", gqa["a"], "--inputs", gqa["inputs"], "-o", cap])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["compare", "--a", cap, "--b", cap, "--truth"])
    assert r.exit_code == 2 and "--truth runs side A's implementation in float64" in r.output


def test_transformers_float64_is_refused_in_one_line():
    # transformers' Gemma / SigLIP compute softmax, RMSNorm and RoPE in float32 even in a float64 model: run anyway,
    # it sat ~5e-7 from torch float64 (float32 rounding), so it is no ground truth
    from parity import hf_side

    with pytest.raises(ConfigError, match="transformers cannot run as float64: .* computes softmax, RMSNorm and RoPE"):
        hf_side.build_model(TINY_VARIANTS[GQA], get_conventions("transformers"), dtype="float64")
