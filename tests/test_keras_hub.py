"""keras-hub (0.32, JAX backend) as a third, outside reference (tests/keras_oracle.py).

Both implementations under the `keras_hub` preset match keras-hub within 1e-5 relative at every point it exposes,
on PaliGemma 1 and 2 tiny configs whose sequence (16 image + 14 text tokens) is longer than the window (8); greedy
generation gives its tokens, its step logits and its KV caches; and every convention of the preset is pinned by an
experiment: changing it breaks the match (the normalizer dtype only shows in bfloat16; the position origin not at
all, RoPE being relative, so that one is keras-hub's source: positions arange(S)). Skipped without keras-hub (the
`keras` extra)."""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np
import pytest

os.environ["KERAS_BACKEND"] = "jax"  # before keras is first imported
keras = pytest.importorskip("keras")
pytest.importorskip("keras_hub")
if keras.backend.backend() != "jax":
    pytest.skip(f"keras was imported with the {keras.backend.backend()} backend", allow_module_level=True)

from hf_oracle import rel_err  # noqa: E402
from keras_oracle import keras_backbone, keras_batch, keras_decode, keras_forward, keras_generate, keras_graph_points  # noqa: E402
from torch_fixtures import make_inputs, valid_rows  # noqa: E402

from parity import points, spec  # noqa: E402
from parity.config import TINY_VARIANTS, QueryScale  # noqa: E402
from parity.conventions import PRESETS  # noqa: E402
from parity.jax_impl import api as jax_api  # noqa: E402
from parity.torch_impl import api as torch_api  # noqa: E402

TOL = 1e-5
KH = PRESETS["keras_hub"]
IMPLS = {"torch": torch_api, "jax": jax_api}
MAX_NEW = 6


@functools.cache
def _keras(name: str, dtype: str = "float32", weights: str | None = None):
    """(config, params, keras-hub backbone holding them): built once per config, dtype and weights."""
    cfg = TINY_VARIANTS[name]
    params = spec.random_params(cfg, seed=1, weights=weights)
    return cfg, params, keras_backbone(cfg, params, dtype)


@functools.cache
def _keras_points(name: str, weights: str | None = None):
    cfg, params, bb = _keras(name, weights=weights)
    inputs = make_inputs(cfg)
    return cfg, params, inputs, keras_forward(cfg, bb, inputs)


@functools.cache
def _prefix_only(name: str):
    """Inputs whose prompt is all prefix, and keras-hub's greedy tokens for them."""
    cfg, _, bb = _keras(name)
    inputs = make_inputs(cfg)
    inputs["mask_ar"] = np.zeros_like(inputs["mask_ar"])
    return inputs, keras_generate(bb, inputs, MAX_NEW)


@functools.cache
def _keras_decode(name: str):
    """keras-hub's step logits and caches, fed its own greedy tokens."""
    cfg, _, bb = _keras(name)
    inputs, tokens = _prefix_only(name)
    return keras_decode(cfg, bb, inputs, tokens)


def _errors(cfg, inputs, ours: dict, theirs: dict) -> dict[str, float]:
    """max rel error per keras-hub point over the real positions (keras-hub's logits: text positions only)."""
    valid, t = valid_rows(cfg, inputs), cfg.num_image_tokens
    errs = {}
    for name, b in theirs.items():
        a = ours[name]
        if name == points.LOGITS:
            a, b = a[:, t:][valid[:, t:]], b[valid[:, t:]]
        elif name.startswith("llm/"):
            a, b = a[valid], b[valid]
        assert a.shape == b.shape, name
        errs[name] = rel_err(a, b)
    return errs


def _forward(impl, cfg, conv, params, inputs, dtype="float32", names=None):
    api = IMPLS[impl]
    return api.forward(
        api.build_model(cfg, conv, dtype=dtype, params=params), inputs, names or points.forward_points(cfg)
    )


# tiny-pg2-28b: keras-hub does not apply the 28B query scale (test_keras_hub_ignores_the_28b_query_scale).
MATCHED = [name for name in TINY_VARIANTS if name != "tiny-pg2-28b"]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("name", MATCHED)
def test_every_keras_point_matches(name, impl):
    cfg, params, inputs, theirs = _keras_points(name)
    assert sorted(theirs) == sorted(
        [
            points.IMG_POS_EMBED,
            points.IMG_FINAL_NORM,
            points.PROJECTOR,
            points.LLM_INPUT,
            points.LLM_FINAL_NORM,
            points.LOGITS,
        ]
        + [points.img_block_out(i) for i in range(cfg.vision.depth)]
        + [points.llm_block_out(i) for i in range(cfg.text.depth)]
    )
    errs = _errors(cfg, inputs, _forward(impl, cfg, KH, params, inputs), theirs)
    assert max(errs.values()) <= TOL, errs


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("name", ["tiny-pg1-mqa", "tiny-pg2-gqa"])
def test_greedy_generation_matches(name, impl):
    """Rows of different lengths decoded together by ours (right padding), one by one by keras-hub (prompt = prefix:
    keras-hub's generation has no suffix); tokens equal, step logits and the written cache slots within 1e-5."""
    cfg, params, bb = _keras(name)
    inputs, keras_tokens = _prefix_only(name)
    api = IMPLS[impl]
    ours = api.generate(
        api.build_model(cfg, KH, params=params),
        inputs,
        MAX_NEW,
        ignore_eos=True,
        return_logits=True,
        capture=points.cache_points(cfg),
    )
    np.testing.assert_array_equal(ours["tokens"], keras_tokens)
    t, p = cfg.num_image_tokens, cfg.num_image_tokens + inputs["text"].shape[1]
    for r, (logits, caches) in enumerate(_keras_decode(name)):
        assert rel_err(ours["logits"][r], logits) <= TOL, (r, rel_err(ours["logits"][r], logits))
        n = int(inputs["mask_input"][r].sum())
        slots = np.r_[np.arange(t + n), p + np.arange(MAX_NEW - 1)]  # ours: prompt at 0.., new tokens from P
        for point, theirs in caches.items():
            assert rel_err(ours[point][r, slots], theirs) <= TOL, (r, point, rel_err(ours[point][r, slots], theirs))


# Each convention of the preset, changed alone, and the points that must then leave keras-hub (PaliGemma 2: every
# convention applies; window 8 < 30 tokens).
CHANGES = [
    (dict(sliding_window="transformers"), points.llm_block_out(0)),  # the prefix block exempt: not keras-hub
    (dict(sliding_window="off"), points.llm_block_out(0)),
    (dict(final_softcap="never"), points.LOGITS),
    (dict(final_softcap="decode_only"), points.LOGITS),  # a full forward is capped in keras-hub
    (dict(attn_softcap=False), points.llm_block_out(0)),
]


@pytest.mark.parametrize("impl", list(IMPLS))
def test_each_convention_of_the_preset_is_observed(impl):
    cfg, params, inputs, theirs = _keras_points("tiny-pg2-gqa", "chaotic")  # scores and logits large enough to cap
    for change, point in CHANGES:
        errs = _errors(cfg, inputs, _forward(impl, cfg, dataclasses.replace(KH, **change), params, inputs), theirs)
        assert errs[point] > 100 * TOL, (change, errs)
    # RoPE is relative: the origin moves nothing beyond rounding, so keras-hub cannot tell 0 from 1.
    errs = _errors(cfg, inputs, _forward(impl, cfg, dataclasses.replace(KH, position_origin=1), params, inputs), theirs)
    assert max(errs.values()) <= TOL, errs


@pytest.mark.parametrize("impl", list(IMPLS))
def test_normalizer_is_rounded_to_the_embedding_dtype(impl):
    """bfloat16: keras-hub's text embeddings equal ours bit for bit under normalizer_dtype=param (sqrt(48) rounded
    to 6.9375 and multiplied in bf16), and not under float32."""
    cfg, params, bb = _keras("tiny-pg2-gqa", "bfloat16")
    inputs = make_inputs(cfg)
    theirs = keras_graph_points(cfg, bb, keras_batch(inputs))[points.LLM_INPUT]
    text = lambda x: x[:, cfg.num_image_tokens :][inputs["mask_input"] == 1]
    got = {
        nd: text(
            _forward(
                impl, cfg, dataclasses.replace(KH, normalizer_dtype=nd), params, inputs, "bfloat16", [points.LLM_INPUT]
            )[points.LLM_INPUT]
        )
        for nd in ("param", "float32")
    }
    np.testing.assert_array_equal(got["param"], text(theirs))
    assert (got["float32"] != text(theirs)).mean() > 0.1


@pytest.mark.parametrize("impl", list(IMPLS))
def test_keras_hub_ignores_the_28b_query_scale(impl):
    """keras-hub 0.32's GemmaDecoderBlock builds its attention with `query_head_dim_normalize=True` whatever the
    backbone is given, so PaliGemma 2 28B-shaped models (query_head_dim_normalize=False, 1/sqrt(D/N) = 1/sqrt(144))
    scale queries by 1/sqrt(H) (1/sqrt(128)) there: keras-hub matches our model of the same weights only when that
    model is given the head-dim scale. (When this fails, keras-hub fixed it: move tiny-pg2-28b into MATCHED.)"""
    cfg, params, inputs, theirs = _keras_points("tiny-pg2-28b")
    head_dim_scaled = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, query_scale=QueryScale.HEAD_DIM))
    errs = _errors(cfg, inputs, _forward(impl, cfg, KH, params, inputs), theirs)
    assert errs[points.llm_block_out(0)] > 100 * TOL, errs
    errs = _errors(cfg, inputs, _forward(impl, head_dim_scaled, KH, params, inputs), theirs)
    assert max(errs.values()) <= TOL, errs


def test_the_shipped_keras_hub_bundles_are_what_keras_hub_gives(tmp_path):
    """golden/record_goldens.py --from keras_hub, re-run into a copy of each shipped bundle: the same tokens, and
    every point within float rounding of the shipped one (across machines and library versions: 1e-5 relative)."""
    import shutil
    import sys

    from parity import golden

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "golden"))
    import record_goldens as rg

    inputs = str(tmp_path / "prefix.npz")
    rg.prefix_only_inputs(inputs)
    for bundle, ckpt in rg.KERAS_BUNDLES.items():
        copy = tmp_path / bundle
        shutil.copytree(os.path.join(rg.HERE, bundle), copy)
        # the copy's checkpoint path is relative to the bundle: keep it beside, as in golden/
        shutil.copy(os.path.join(rg.HERE, ckpt), tmp_path / ckpt)
        path = str(tmp_path / ckpt)
        rep = golden.record(
            path,
            inputs,
            str(copy),
            impl="keras_hub",
            convention="keras_hub",
            steps=rg.STEPS,
            update=True,
            runner=rg.keras_runner(path, inputs, rg.STEPS),
        )
        ch = rep["changes"]
        assert "points_changed" in ch, ch  # same inputs, model and conventions: compared point by point
        assert all(p["max_rel"] <= 1e-5 for p in ch["points_changed"]), ch["points_changed"]
        assert ch["tokens_changed_rows"] == [], ch
        assert ch["step_logits_max_abs_change"] <= 1e-4, ch
