"""big_vision's float16 mixed precision in the training step (issue 22; docs/training.md "Float16 mixed precision").

`--frozen-dtype float16` is deterministic to float32 rounding: torch vs jax to the float32 tolerances, and both
against a float64 step on weights rounded by hand here (numpy float16), with each float16 place checked on its own.
`--vit-matmul-dtype float16` depends on evaluation order: torch vs jax vs jax op by op, held within the calibrated
profile below, and it must move the gradients visibly from the float16-weights-only step."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from test_train_step import _float64_torch, build, scale_of, train_inputs

from parity import spec, training
from parity.config import TINY_VARIANTS
from parity.conventions import PRESETS
from parity.errors import ConfigError
from parity.jax_impl import api as jax_api
from parity.jax_impl import train as jax_train
from parity.jax_impl.load import state_to_canonical as jax_state_to_canonical
from parity.torch_impl import api as torch_api
from parity.torch_impl import train as torch_train
from parity.torch_impl.load import state_to_canonical
from parity.training import TrainOptions

HALF = TrainOptions(steps=3, frozen_dtype="float16")  # the guide: attention trained, everything else float16
VIT16 = dataclasses.replace(HALF, vit_matmul_dtype="float16")
# The float16-activation profile (docs/training.md), calibrated on the four tiny configs x 2 seeds, attention-only
# and LLM-only: distances as multiples of the float16 ViT's own effect (vit16 step vs float16-weights-only step).
# Measured: torch vs jax <= 1.8x (loss) / 1.7x (gradients); jax jitted vs op by op <= 0.22x / 0.22x, and on the
# image tokens themselves <= 0.46x of the largest token difference (0.7% of the mean one).
PROFILE_TORCH_JAX = 2.5
PROFILE_JIT_OP_BY_OP = 1.0
VISIBLE = 10 * 3e-5  # the float16 ViT's gradient effect must be 10x the float32 gradient tolerance


def distance(a, b) -> tuple[float, float]:
    """(worst relative loss difference over the steps, worst first-step gradient difference / the leaf's max)."""
    loss = max(abs(x.loss - y.loss) / abs(y.loss) for x, y in zip(a.steps, b.steps, strict=True))
    return loss, max(float(np.abs(a.grads[k] - b.grads[k]).max()) / scale_of(b.grads, k) for k in b.grads)


def run(api, cfg, options, params=None, seed=1):
    model = api.build_model(
        cfg, PRESETS["big_vision"], params=params or spec.random_params(cfg, seed=seed), precision="highest"
    )
    return api.train_step(model, train_inputs(cfg, seed=6), options)


def hand_rounded(cfg, params, trainable, rms=True) -> dict[str, np.ndarray]:
    """float64 weights as big_vision computes with them under float16 frozen leaves, by hand: every frozen leaf
    rounded to float16; an LLM RMSNorm scale s replaced by float16(1 + float16(s)) - 1 (its `1 + scale` is formed
    in float16), unless rms=False."""
    out = {}
    for k, v in params.items():
        if k in trainable:
            out[k] = v.astype(np.float64)
            continue
        h = v.astype(np.float16)
        if rms and k.startswith("llm/") and k.endswith("norm/scale"):
            h = (np.float16(1.0) + h).astype(np.float16).astype(np.float64) - 1.0
        out[k] = h.astype(np.float64)
    return out


# -- float16 frozen weights: exact to float32 ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("variant", "trainable"),
    [("tiny-pg2-gqa", ("llm/layers/attn/*",)), ("tiny-pg2-28b", ("llm/layers/attn/*", "img/*"))],
)
def test_frozen_float16_torch_and_jax_take_the_same_steps(variant, trainable):
    cfg, options = TINY_VARIANTS[variant], dataclasses.replace(HALF, trainable=trainable)
    a, b = run(torch_api, cfg, options), run(jax_api, cfg, options)
    loss, grads = distance(a, b)
    assert loss <= 1e-5 and grads <= 3e-5, (loss, grads)
    for k in a.params:
        assert np.abs(a.params[k] - b.params[k]).max() <= 1e-6 * max(1.0, float(np.abs(a.params[k]).max())), k
    full = run(torch_api, cfg, dataclasses.replace(options, frozen_dtype="float32"))
    moved = distance(a, full)
    assert moved[1] > 10 * 3e-5, moved  # plainly visible beside the tolerance
    print(f"{variant} {trainable}: torch-jax {loss:.1e} {grads:.1e}; vs float32 {moved[0]:.1e} {moved[1]:.1e}")


@pytest.mark.parametrize("api", [torch_api, jax_api], ids=["torch", "jax"])
def test_frozen_float16_is_the_float64_step_on_hand_rounded_weights(api):
    """tiny-pg1-mqa: D = 64, so sqrt(D) = 8 and the float16 embedding product is exact: what remains are the
    rounded weights and RMSNorm's float16 `1 + scale`, both by hand here, run in float64 by torch. Leaving the
    RMSNorm place out is visibly wrong (the test can fail)."""
    cfg = TINY_VARIANTS["tiny-pg1-mqa"]
    params, inputs = spec.random_params(cfg, seed=4), train_inputs(cfg, seed=6)
    trainable = training.trainable_leaves(HALF, params)
    got = run(api, cfg, HALF, params=params)

    def reference(rms):
        model = _float64_torch(cfg, PRESETS["big_vision"], hand_rounded(cfg, params, trainable, rms))
        return torch_api.train_step(model, inputs, dataclasses.replace(HALF, frozen_dtype="float32"))

    loss, grads = distance(got, reference(rms=True))
    assert loss <= 1e-5 and grads <= 3e-5, (loss, grads)
    without = distance(got, reference(rms=False))
    assert without[0] > 1e-5 or without[1] > 3e-5, without
    print(f"vs float64 reference: loss {loss:.1e} grads {grads:.1e}; without the RMSNorm place {without}")


def test_text_embedding_is_formed_in_float16():
    """D = 48: sqrt(D) = 6.9282 rounds to 6.9297 in float16; big_vision's product is float16 too."""
    cfg = TINY_VARIANTS["tiny-pg2-gqa"]
    params, text = spec.random_params(cfg, seed=1), train_inputs(cfg)["text"]
    table = params["llm/embedder/input_embedding"]
    want = table.astype(np.float16)[text] * np.float16(np.sqrt(np.float32(48)))  # numpy float16 arithmetic
    assert want.dtype == np.float16
    t = torch_train._text_embedding(build(torch_api, cfg), torch.as_tensor(text.astype(np.int64)))
    j = jax_train._text_embedding(build(jax_api, cfg), jax.numpy.asarray(text))
    np.testing.assert_array_equal(t.numpy(), want)
    np.testing.assert_array_equal(np.asarray(j), want)
    float32 = (table[text] * np.float32(np.sqrt(48))).astype(np.float16)
    assert (float32 != want).mean() > 0.05  # rounding sqrt(D) is visible


def test_every_leaf_trained_is_the_float32_step():
    """Nothing frozen: --frozen-dtype float16 changes nothing (bit for bit)."""
    cfg = TINY_VARIANTS["tiny-pg2-gqa"]
    options = TrainOptions(trainable=("all",), steps=2)
    for api in (torch_api, jax_api):
        a, b = run(api, cfg, options), run(api, cfg, dataclasses.replace(options, frozen_dtype="float16"))
        assert [s.loss for s in a.steps] == [s.loss for s in b.steps]
        for k in a.grads:
            np.testing.assert_array_equal(a.grads[k], b.grads[k])


@pytest.mark.parametrize("api", [torch_api, jax_api], ids=["torch", "jax"])
def test_frozen_leaves_leave_float16_steps_bit_identical(api):
    cfg = TINY_VARIANTS["tiny-pg2-gqa"]
    model = build(api, cfg)
    canonical = state_to_canonical if api is torch_api else lambda m: jax_state_to_canonical(m.module)
    before = canonical(model)
    result = api.train_step(model, train_inputs(cfg), dataclasses.replace(VIT16, steps=2, lr=0.1))
    after = canonical(model)
    assert {k for k in before if not np.array_equal(before[k], after[k])} == set(result.params)
    assert all(v.dtype == np.float32 for v in after.values())


# -- float16 ViT activations: within the calibrated profile -------------------------------------------------------
@pytest.mark.parametrize(
    ("variant", "trainable"), [("tiny-pg2-gqa", ("llm/layers/attn/*",)), ("tiny-pg1-kn", ("llm/*",))]
)
def test_float16_vit_torch_and_jax_within_the_profile(variant, trainable):
    cfg = TINY_VARIANTS[variant]
    half, vit16 = (dataclasses.replace(o, trainable=trainable) for o in (HALF, VIT16))
    t16, j16 = run(torch_api, cfg, vit16), run(jax_api, cfg, vit16)
    effect = np.maximum(distance(t16, run(torch_api, cfg, half)), distance(j16, run(jax_api, cfg, half)))
    assert effect[1] > VISIBLE, effect  # the float16 ViT visibly moves the gradients
    spread = np.asarray(distance(t16, j16))
    assert (spread <= PROFILE_TORCH_JAX * effect).all(), (spread, effect)
    print(f"{variant}: effect {effect}, torch-jax {spread / effect} of it")


def test_float16_vit_jitted_and_op_by_op_jax_within_the_profile():
    """The float16 ViT's image tokens, jitted vs op by op (jax.disable_jit): the ViT is frozen, so the step is a
    float32 function of them. Few tokens differ, by less than the float16 ViT's own effect."""
    cfg = TINY_VARIANTS["tiny-pg1-mqa"]
    model = build(jax_api, cfg)
    batch = jax_train._batch(model, train_inputs(cfg, seed=6))
    graphdef, leaves, frozen = jax_train._leaves(model, ["llm/layers/attn/q_einsum/w"])
    tokens = lambda f: nnx.merge(graphdef, leaves, f).embed_image(batch["image"]).astype(np.float32)
    vit16, half = (jax_train._half(frozen, o) for o in (VIT16, HALF))
    jitted, float32 = np.asarray(jax.jit(tokens)(vit16)), np.asarray(jax.jit(tokens)(half))
    with jax.disable_jit():
        op_by_op = np.asarray(tokens(vit16))
    effect, spread = np.abs(jitted - float32), np.abs(jitted - op_by_op)
    assert effect.max() > 1e-4 * np.abs(float32).max()  # float16 activations are visible
    assert spread.max() <= PROFILE_JIT_OP_BY_OP * effect.max() and spread.mean() <= 0.05 * effect.mean()
    print(f"image tokens: jit vs op by op {spread.max() / effect.max():.2f} (max), {spread.mean() / effect.mean():.3f}")


def test_unreproduced_combinations_are_refused():
    cfg = TINY_VARIANTS["tiny-pg2-gqa"]
    for api in (torch_api, jax_api):
        model = build(api, cfg)
        with pytest.raises(ConfigError, match="needs --frozen-dtype float16"):
            api.train_step(model, train_inputs(cfg), TrainOptions(vit_matmul_dtype="float16"))
        with pytest.raises(ConfigError, match="trainable ViT leaves"):
            api.train_step(model, train_inputs(cfg), dataclasses.replace(VIT16, trainable=("all",)))
