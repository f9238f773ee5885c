"""JAX (Flax NNX) PaliGemma forward against the PyTorch implementation (both presets) and transformers (eager),
float32, `highest` precision, CPU, every tiny config; single blocks fed torch's inputs; loading; capture."""

from __future__ import annotations

import dataclasses

import jax
import ml_dtypes
import numpy as np
import pytest
from hf_oracle import hf_forward, hf_model, rel_err
from torch_fixtures import make_inputs, valid_rows

from parity import points, spec
from parity.config import TINY_VARIANTS
from parity.conventions import PRESETS, Conventions
from parity.errors import CheckpointError, ConfigError
from parity.jax_impl import api
from parity.jax_impl.load import state_to_canonical
from parity.torch_impl import api as torch_api

TOL = 1e-5


@pytest.fixture(scope="module", params=list(TINY_VARIANTS))
def case(request):
    """One config: params, inputs, and per preset the jax model, jax points and torch points (all computed once)."""
    cfg = TINY_VARIANTS[request.param]
    params = spec.random_params(cfg, seed=1)
    inputs = make_inputs(cfg)
    names = points.forward_points(cfg)
    runs = {}
    for preset, conv in PRESETS.items():
        ours = api.build_model(cfg, conv, params=params)
        runs[preset] = (
            ours,
            api.forward(ours, inputs, names),
            torch_api.forward(torch_api.build_model(cfg, conv, params=params), inputs, names),
        )
    return cfg, params, inputs, runs


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_point_matches_torch(case, preset):
    cfg, _, _, runs = case
    _, got, want = runs[preset]
    assert list(got) == points.forward_points(cfg)
    for name in points.forward_points(cfg):  # padding positions included: both implement the same masks
        assert got[name].shape == want[name].shape and got[name].dtype == np.float32, name
        assert rel_err(got[name], want[name]) <= TOL, (name, rel_err(got[name], want[name]))


def test_every_point_matches_transformers(case):
    cfg, params, inputs, runs = case
    got = runs["transformers"][1]
    theirs = hf_forward(hf_model(cfg, params), cfg, inputs)
    valid = valid_rows(cfg, inputs)
    for name in points.forward_points(cfg):
        a, b = got[name], theirs[name]
        assert a.shape == b.shape, name
        if a.shape[1] == valid.shape[1]:  # llm/* and logits: transformers' padding rows are never compared
            a, b = a[valid], b[valid]
        assert rel_err(a, b) <= TOL, (name, rel_err(a, b))


@pytest.mark.parametrize("preset", list(PRESETS))
def test_blocks_fed_torch_inputs_give_torch_outputs(case, preset):
    """Teacher forcing: jax block i on torch's captured input of block i reproduces torch's block i outputs."""
    cfg, _, inputs, runs = case
    ours, _, want = runs[preset]
    for i in range(cfg.vision.depth):
        x = want[points.IMG_POS_EMBED if i == 0 else points.img_block_out(i - 1)]
        got = api.vit_block(ours, i, x)
        assert sorted(got) == sorted([points.img_block_attn(i), points.img_block_out(i)])
        for name, y in got.items():
            assert rel_err(y, want[name]) <= TOL, (name, rel_err(y, want[name]))
    for i in range(cfg.text.depth):
        x = want[points.LLM_INPUT if i == 0 else points.llm_block_out(i - 1)]
        got = api.llm_block(ours, i, x, inputs)
        assert sorted(got) == sorted([points.llm_block_attn(i), points.llm_block_mlp(i), points.llm_block_out(i)])
        for name, y in got.items():
            assert rel_err(y, want[name]) <= TOL, (name, rel_err(y, want[name]))
    with pytest.raises(ValueError, match="blocks 0.."):
        api.llm_block(ours, cfg.text.depth, x, inputs)


def test_capture_is_exact_and_free(case):
    cfg, _, inputs, runs = case
    ours, every, _ = runs["transformers"]
    plain = api.forward(ours, inputs)
    assert list(plain) == [points.LOGITS] and plain[points.LOGITS].dtype == np.float32
    np.testing.assert_array_equal(plain[points.LOGITS], every[points.LOGITS])  # capture changes no number
    batch = api._batch(ours, inputs)
    outs = jax.eval_shape(lambda s, b: api._forward(ours.graphdef, s, b, (points.LOGITS,)), ours.state, batch)
    assert list(outs) == [points.LOGITS]  # capture off: the compiled forward returns nothing else
    some = api.forward(ours, inputs, [points.PROJECTOR, points.llm_block_mlp(1)])
    assert sorted(some) == sorted([points.PROJECTOR, points.llm_block_mlp(1)])
    np.testing.assert_array_equal(some[points.llm_block_mlp(1)], every[points.llm_block_mlp(1)])
    with pytest.raises(ValueError, match="k_cache"):
        api.forward(ours, inputs, [points.llm_k_cache(0)])


def test_params_load_as_stored(case):
    """The canonical npz layout is the model's state: same keys, stacked shapes, values, nothing else."""
    cfg, params, _, runs = case
    ours = runs["big_vision"][0]
    back = state_to_canonical(ours.module)
    assert sorted(back) == sorted(params)
    for k in params:
        np.testing.assert_array_equal(back[k], params[k])
    assert ours.module.llm.layers.pre_ffw_norm.scale[...].shape == (cfg.text.depth, cfg.text.width)


def test_depth_is_scanned_not_unrolled():
    """The traced forward has the same size whatever the depth: layers run in a scan, not a Python loop."""
    cfg = TINY_VARIANTS["tiny-pg2-gqa"]
    deeper = dataclasses.replace(
        cfg, text=dataclasses.replace(cfg.text, depth=7), vision=dataclasses.replace(cfg.vision, depth=5)
    )
    sizes = []
    for c in (cfg, deeper):
        m = api.build_model(c, PRESETS["transformers"])
        batch = api._batch(m, make_inputs(c))
        jaxpr = jax.make_jaxpr(lambda s, b: api._forward.__wrapped__(m.graphdef, s, b, (points.LOGITS,)))(
            m.state, batch
        )
        sizes.append(len(jaxpr.eqns))
        assert "scan" in str(jaxpr)
    assert sizes[0] == sizes[1]


@pytest.mark.parametrize("what", ["missing", "unexpected", "shape", "dtype"])
def test_load_errors_name_key_and_shapes(what):
    cfg = TINY_VARIANTS["tiny-pg1-mqa"]
    params = spec.random_params(cfg)
    key = "llm/layers/attn/q_einsum/w"
    if what == "missing":
        del params[key]
    elif what == "unexpected":
        params["llm/extra"] = np.zeros(3, np.float32)
        key = "llm/extra"
    elif what == "shape":
        params[key] = params[key][:, :, :-1]
    else:
        params[key] = params[key].astype(np.int32)
    with pytest.raises(CheckpointError) as e:
        api.build_model(cfg, PRESETS["big_vision"], params=params)
    if what == "dtype":
        assert "int32" in str(e.value) and "bfloat16" in str(e.value)
    else:
        assert key in str(e.value) and "expected" in str(e.value)
    if what == "shape":
        assert "(2, 4, 63, 16)" in str(e.value) and "(2, 4, 64, 16)" in str(e.value)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_params_load_exactly(dtype):
    cfg = TINY_VARIANTS["tiny-pg2-gqa"]
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
    params = spec.random_params(cfg, dtype=np_dtype)
    model = api.build_model(cfg, PRESETS["transformers"], dtype=dtype, params=params)
    w = model.module.llm.layers.attn.kv_einsum.w[...]
    assert w.dtype == np_dtype
    np.testing.assert_array_equal(np.asarray(w), params["llm/layers/attn/kv_einsum/w"])
    inputs = make_inputs(cfg)
    low = api.forward(model, inputs)[points.LOGITS]
    f32 = api.forward(api.build_model(cfg, PRESETS["transformers"], params=params), inputs)[points.LOGITS]
    valid = valid_rows(cfg, inputs)
    assert low.dtype == np.float32 and rel_err(low[valid], f32[valid]) < 0.1


def test_every_convention_option_matches_torch():
    """The non-preset options (attn_softcap off, float32 normalizer, final softcap never) mirror torch too."""
    cfg = TINY_VARIANTS["tiny-pg2-28b"]
    params = spec.random_params(cfg, seed=4)
    inputs = make_inputs(cfg, seed=5)
    conv = Conventions(
        position_origin=1,
        final_softcap="never",
        sliding_window="transformers",
        attn_softcap=False,
        normalizer_dtype="float32",
    )
    got = api.forward(api.build_model(cfg, conv, params=params), inputs)[points.LOGITS]
    want = torch_api.forward(torch_api.build_model(cfg, conv, params=params), inputs)[points.LOGITS]
    assert rel_err(got, want) <= TOL


def test_precision_and_device_options():
    cfg = TINY_VARIANTS["tiny-pg1-kn"]
    params = spec.random_params(cfg, seed=6)
    inputs = make_inputs(cfg)
    ref = api.forward(api.build_model(cfg, PRESETS["big_vision"], params=params), inputs)[points.LOGITS]
    for precision in ("high", "default"):  # on CPU float32 matmuls are exact at every setting
        m = api.build_model(cfg, PRESETS["big_vision"], params=params, precision=precision)
        assert m.precision == precision
        assert rel_err(api.forward(m, inputs)[points.LOGITS], ref) <= TOL
    with pytest.raises(ConfigError, match="--precision"):
        api.build_model(cfg, PRESETS["big_vision"], precision="fast")
    assert api.resolve_device("cpu") == "cpu:0" and api.resolve_device("CPU:0") == "cpu:0"
    assert api.device_description("cpu").startswith("cpu:0 (cpu")
    for bad, msg in (("cpu:7", "only 1 cpu"), ("npu", "expected cpu, gpu or tpu"), ("cpu:x", "expected")):
        with pytest.raises(ConfigError, match=msg):
            api.resolve_device(bad)
