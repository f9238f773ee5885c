"""PyTorch PaliGemma forward against transformers (eager, float32, CPU) on every tiny config; loading; capture."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_oracle import hf_forward, hf_model, rel_err
from torch_fixtures import make_inputs, valid_rows

from parity import points, spec
from parity.config import TINY_VARIANTS
from parity.conventions import PRESETS
from parity.errors import CheckpointError
from parity.torch_impl import api, build_model
from parity.torch_impl.load import state_to_canonical

TOL = 1e-5


@pytest.fixture(scope="module", params=list(TINY_VARIANTS))
def case(request):
    cfg = TINY_VARIANTS[request.param]
    params = spec.random_params(cfg, seed=1)
    inputs = make_inputs(cfg)
    ours = build_model(cfg, PRESETS["transformers"], params=params)
    return cfg, params, inputs, ours, hf_forward(hf_model(cfg, params), cfg, inputs)


def test_every_point_matches_transformers(case):
    cfg, _, inputs, ours, theirs = case
    got = api.forward(ours, inputs, points.forward_points(cfg))
    assert list(got) == points.forward_points(cfg)
    valid = valid_rows(cfg, inputs)
    for name in points.forward_points(cfg):
        a, b = got[name], theirs[name]
        assert a.shape == b.shape, name
        if a.shape[1] == valid.shape[1]:  # llm/* and logits: padding rows are never compared
            a, b = a[valid], b[valid]
        assert rel_err(a, b) <= TOL, (name, rel_err(a, b))


def test_capture_is_exact_and_free(case):
    cfg, _, inputs, ours, _ = case
    plain = api.forward(ours, inputs)
    assert list(plain) == [points.LOGITS]
    some = [points.PROJECTOR, points.llm_block_mlp(1), points.LOGITS]
    got = api.forward(ours, inputs, some)
    assert sorted(got) == sorted(some)
    np.testing.assert_array_equal(got[points.LOGITS], plain[points.LOGITS])
    assert got[points.PROJECTOR].shape == (3, cfg.num_image_tokens, cfg.text.width)
    assert plain[points.LOGITS].dtype == np.float32
    with pytest.raises(ValueError, match="k_cache"):
        api.forward(ours, inputs, [points.llm_k_cache(0)])


def test_state_round_trip(case):
    cfg, params, _, ours, _ = case
    back = state_to_canonical(ours)
    assert sorted(back) == sorted(params)
    for k in params:
        np.testing.assert_array_equal(back[k], params[k])


@pytest.mark.parametrize("what", ["missing", "unexpected", "shape"])
def test_load_errors_name_key_and_shapes(what):
    cfg = TINY_VARIANTS["tiny-pg1-mqa"]
    params = spec.random_params(cfg)
    key = "llm/layers/attn/q_einsum/w"
    if what == "missing":
        del params[key]
    elif what == "unexpected":
        params["llm/extra"] = np.zeros(3, np.float32)
        key = "llm/extra"
    else:
        params[key] = params[key][:, :, :-1]
    model = build_model(cfg, PRESETS["big_vision"])
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(CheckpointError) as e:
        api.build_model(cfg, PRESETS["big_vision"], params=params)
    assert key in str(e.value) and "expected" in str(e.value)
    if what == "shape":
        assert "(2, 4, 63, 16)" in str(e.value) and "(2, 4, 64, 16)" in str(e.value)
    from parity.torch_impl.load import load_canonical

    with pytest.raises(CheckpointError):
        load_canonical(model, params)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # untouched


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_params_load_exactly(dtype):
    import ml_dtypes

    cfg = TINY_VARIANTS["tiny-pg2-gqa"]
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
    params = spec.random_params(cfg, dtype=np_dtype)
    model = build_model(cfg, PRESETS["transformers"], dtype=dtype, params=params)
    w = model.llm.layers[1].attn.kv_einsum.w
    assert w.dtype == getattr(torch, dtype)
    np.testing.assert_array_equal(w.float().numpy(), params["llm/layers/attn/kv_einsum/w"][1].astype(np.float32))
    # A half-precision forward runs and stays near the float32 one.
    inputs = make_inputs(cfg)
    low = api.forward(model, inputs)[points.LOGITS]
    f32 = api.forward(build_model(cfg, PRESETS["transformers"], params=params), inputs)[points.LOGITS]
    valid = valid_rows(cfg, inputs)
    assert rel_err(low[valid], f32[valid]) < 0.1


def test_weights_views_are_free():
    """The matmul views of einsum-shaped kernels need no copy (memory laid out for them)."""
    cfg = TINY_VARIANTS["tiny-pg2-gqa"]
    model = build_model(cfg, PRESETS["transformers"], dtype="bfloat16")
    w = model.llm.layers[0].attn.q_einsum.w
    assert w.permute(1, 0, 2).reshape(cfg.text.width, -1).data_ptr() == w.data_ptr()
    assert w.permute(1, 0, 2).is_contiguous()
    assert model.llm.layers[0].mlp.gating_einsum.permute(1, 0, 2).is_contiguous()
