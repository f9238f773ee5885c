"""Each convention switch changes exactly what it should, and nothing else."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch_fixtures import make_inputs, valid_rows

from parity import points, spec
from parity.config import TINY_VARIANTS
from parity.conventions import PRESETS, Conventions
from parity.torch_impl import api, build_model

PG1, PG2 = TINY_VARIANTS["tiny-pg1-mqa"], TINY_VARIANTS["tiny-pg2-gqa"]
IMG_POINTS = lambda cfg: [p for p in points.forward_points(cfg) if p.startswith("img/")]


def run(cfg, conv, points_=None, dtype="float32", inputs=None, params=None):
    params = spec.random_params(cfg, seed=4) if params is None else params
    inputs = make_inputs(cfg, seed=5) if inputs is None else inputs
    return api.forward(build_model(cfg, conv, dtype=dtype, params=params), inputs, points_ or [points.LOGITS])


def test_presets():
    assert PRESETS["big_vision"] == Conventions(0, "decode_only", "off", True, "param")
    assert PRESETS["transformers"] == Conventions(1, "always", "transformers", True, "param", "per_token")


@pytest.mark.parametrize("cfg", [PG1, PG2], ids=lambda c: c.name)
def test_position_origin_moves_logits_slightly_not_image(cfg):
    base = Conventions(final_softcap="never")
    a = run(cfg, base, points.forward_points(cfg))
    b = run(cfg, dataclasses.replace(base, position_origin=1), points.forward_points(cfg))
    for p in IMG_POINTS(cfg) + [points.LLM_INPUT]:
        np.testing.assert_array_equal(a[p], b[p])
    valid = valid_rows(cfg, make_inputs(cfg, seed=5))
    diff = np.abs(a[points.LOGITS] - b[points.LOGITS])[valid].max()
    assert 0 < diff < 1e-3 * np.abs(a[points.LOGITS]).max()


def test_final_softcap_maps_by_30_tanh():
    chaotic = spec.random_params(PG2, seed=4, weights="chaotic")  # logits past 7, where 30 tanh(x / 30) bites
    never = run(PG2, Conventions(final_softcap="never"), params=chaotic)[points.LOGITS]
    always = run(PG2, Conventions(final_softcap="always"), params=chaotic)[points.LOGITS]
    decode_only = run(PG2, Conventions(final_softcap="decode_only"), params=chaotic)[points.LOGITS]
    np.testing.assert_allclose(always, 30 * np.tanh(never / 30), rtol=0, atol=2e-6)
    assert np.abs(always - never).max() > 0.1
    np.testing.assert_array_equal(decode_only, never)  # a full forward is uncapped under decode_only
    # PaliGemma 1 has no final softcap: every choice is the same.
    p1 = [run(PG1, Conventions(final_softcap=c))[points.LOGITS] for c in ("never", "always", "decode_only")]
    np.testing.assert_array_equal(p1[0], p1[1]) and np.testing.assert_array_equal(p1[0], p1[2])


def test_final_softcap_decode_only_in_generation():
    params, inputs = spec.random_params(PG2, seed=4), make_inputs(PG2, seed=5)
    gen = lambda c: api.generate(
        build_model(PG2, Conventions(final_softcap=c), params=params),
        inputs,
        6,
        return_logits=True,
    )["logits"]
    never, always, decode_only = gen("never"), gen("always"), gen("decode_only")
    np.testing.assert_array_equal(decode_only[:, 0], never[:, 0])  # prefill logits: uncapped
    np.testing.assert_array_equal(decode_only[:, 1:], always[:, 1:])  # decode steps: capped


def _layer_masks(model, inputs):
    """The attention mask each LLM layer receives in a forward pass."""
    seen = {}
    hooks = [
        blk.attn.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[2].clone()))
        for i, blk in enumerate(model.llm.layers)
    ]
    api.forward(model, inputs)
    for h in hooks:
        h.remove()
    return seen


def test_sliding_window_only_in_local_layers():
    params, inputs = spec.random_params(PG2, seed=4), make_inputs(PG2, seed=5)  # S = 16 + 14 > window 8
    off, tf = (build_model(PG2, Conventions(sliding_window=s), params=params) for s in ("off", "transformers"))
    m_off, m_tf = _layer_masks(off, inputs), _layer_masks(tf, inputs)
    for i in range(PG2.text.depth):
        if PG2.text.is_local_layer(i):
            assert not torch.equal(m_off[i], m_tf[i]) and bool((m_tf[i] <= m_off[i]).all())
        else:
            assert torch.equal(m_off[i], m_tf[i])
    # The image + prefix block stays fully visible; suffix tokens see at most `window` positions back.
    t, w = PG2.num_image_tokens, PG2.text.sliding_window
    row = 0
    assert bool(m_tf[0][row, : t + 3, : t + 3].all())
    last = t + 13
    assert m_tf[0][row, last].nonzero().flatten().tolist() == list(range(last - w + 1, last + 1))
    assert not np.array_equal(api.forward(off, inputs)[points.LOGITS], api.forward(tf, inputs)[points.LOGITS])


def test_sliding_window_identical_when_sequence_is_shorter():
    cfg = dataclasses.replace(PG2, text=dataclasses.replace(PG2.text, sliding_window=64))  # S = 30 < 64
    a = run(cfg, Conventions(sliding_window="off"), points.forward_points(cfg))
    b = run(cfg, Conventions(sliding_window="transformers"), points.forward_points(cfg))
    for p in a:
        np.testing.assert_array_equal(a[p], b[p])


def test_normalizer_dtype_matters_only_in_bf16():
    import ml_dtypes

    params = spec.random_params(PG2, seed=4, dtype=ml_dtypes.bfloat16)
    pts = [points.PROJECTOR, points.LLM_INPUT]
    f32 = [run(PG2, Conventions(normalizer_dtype=n), pts, params=params) for n in ("param", "float32")]
    for p in pts:
        np.testing.assert_array_equal(f32[0][p], f32[1][p])
    bf = [run(PG2, Conventions(normalizer_dtype=n), pts, dtype="bfloat16", params=params) for n in ("param", "float32")]
    t = PG2.num_image_tokens
    np.testing.assert_array_equal(bf[0][points.PROJECTOR], bf[1][points.PROJECTOR])
    np.testing.assert_array_equal(bf[0][points.LLM_INPUT][:, :t], bf[1][points.LLM_INPUT][:, :t])
    assert not np.array_equal(bf[0][points.LLM_INPUT][:, t:], bf[1][points.LLM_INPUT][:, t:])


def test_normalizer_bf16_rounds_sqrt_2048_to_45_25():
    from parity.torch_impl.decoder import Embedder

    emb = Embedder(dataclasses.replace(PG1.text, width=2048)).to(torch.bfloat16)
    values = torch.linspace(-3, 3, emb.input_embedding.shape[1]).to(torch.bfloat16)
    with torch.no_grad():
        emb.input_embedding.copy_(values.expand_as(emb.input_embedding))
    tok = torch.zeros(1, 1, dtype=torch.long)
    param, f32 = emb.encode(tok, "param")[0, 0], emb.encode(tok, "float32")[0, 0]
    assert torch.equal(param, values * torch.tensor(45.25, dtype=torch.bfloat16))
    assert torch.equal(f32, (values.float() * 2048**0.5).to(torch.bfloat16))
    assert not torch.equal(param, f32)


@pytest.mark.parametrize("cfg", [PG1, PG2], ids=lambda c: c.name)
def test_attn_softcap_switch_changes_only_gemma2(cfg):
    a = run(cfg, Conventions(attn_softcap=True), points.forward_points(cfg))
    b = run(cfg, Conventions(attn_softcap=False), points.forward_points(cfg))
    for p in IMG_POINTS(cfg) + [points.LLM_INPUT]:
        np.testing.assert_array_equal(a[p], b[p])
    same = np.array_equal(a[points.LOGITS], b[points.LOGITS])
    assert same == (not cfg.text.gemma2)
