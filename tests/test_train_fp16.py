"""big_vision's float16 mixed precision in the training step (issue 22; docs/training.md "Float16 mixed precision").

`--frozen-dtype float16` is deterministic to float32 rounding: torch vs jax to the float32 tolerances, and both
against a float64 step on weights rounded by hand here (numpy float16), with each float16 place checked on its own.
`--vit-matmul-dtype float16` depends on evaluation order: torch vs jax vs jax op by op, held within the calibrated
profile below, and it must move the gradients visibly from the float16-weights-only step. With float32 ViT leaves
(trained, beside frozen float16 ones, or `--frozen-dtype float32`) the dtypes at the ViT's points are checked against
big_vision's promotion rules, and both implementations against a float64 step with big_vision's float16 cast sites
written here by hand (`reference_image_tokens`), within the same profile."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from test_train_step import _float64_torch, build, scale_of, train_inputs

from parity import points, spec, training
from parity.config import TINY_VARIANTS
from parity.conventions import PRESETS
from parity.jax_impl import api as jax_api
from parity.jax_impl import train as jax_train
from parity.jax_impl.load import state_to_canonical as jax_state_to_canonical
from parity.torch_impl import api as torch_api
from parity.torch_impl import train as torch_train
from parity.torch_impl.load import state_to_canonical, torch_names
from parity.training import TrainOptions

HALF = TrainOptions(steps=3, frozen_dtype="float16")  # the guide: attention trained, everything else float16
VIT16 = dataclasses.replace(HALF, vit_matmul_dtype="float16")
# The float16-activation profile (docs/training.md), calibrated on the four tiny configs x 2 seeds, attention-only
# and LLM-only: distances as multiples of the float16 ViT's own effect (vit16 step vs float16-weights-only step).
# Measured: torch vs jax <= 1.8x (loss) / 1.7x (gradients); jax jitted vs op by op <= 0.22x / 0.22x, and on the
# image tokens themselves <= 0.46x of the largest token difference (0.7% of the mean one). With float32 ViT leaves
# (`all` and --frozen-dtype float32 on the four tiny configs, MIXED below on all four / on tiny-pg1-mqa, 2 seeds):
# torch vs jax <= 1.8x / 1.4x; torch and jax each against the float64 reference (reference_step) <= 1.4x / 1.5x;
# jax jitted vs op by op <= 2.2x / 0.8x (the loss ratio's worst case is a loss effect of only 5e-6).
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


# -- float16 ViT activations with float32 ViT leaves: big_vision's cast sites, in float64 by hand ------------------
class _Round16(torch.autograd.Function):
    """A float16 tensor of big_vision's step, in float64: the value rounded to float16, and its cotangent too (jax
    differentiates a float16 op in float16)."""

    @staticmethod
    def forward(ctx, x):
        return x.to(torch.float16).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        return g.to(torch.float16).to(g.dtype)


def reference_image_tokens(p, half, image, cfg):
    """big_vision's ViT with dtype_mm="float16" (models/vit.py, flax linen), written here from its source: `p` the
    float64 leaves by canonical key (a list of layers when stacked), `half[key]` whether the leaf is float16 (frozen
    under --frozen-dtype float16) or float32. Every float16 value is rounded (`_Round16`); float32 ones stay float64.
    nn.Conv / nn.Dense / MultiHeadDotProductAttention (dtype=dtype_mm): operands cast to float16, product and bias
    add in float16, attention (q / sqrt(Hv), logits, softmax, weighted sum) in float16, GELU in float16. nn.LayerNorm:
    float32, returned as float16 only when its input, scale and bias all are. The position-embedding add, the
    residual adds and the `head` Dense (no dtype) promote: float16 only when every operand is."""
    r = _Round16.apply

    def dense(x, k, b, contract):  # (Dense | DenseGeneral)(dtype=float16): y = x @ k; y += b, each rounded
        return r(r(torch.tensordot(r(x), r(k), contract)) + r(b))

    def norm(x, x16, key, i=None):
        s, b = (p[f"{key}/{n}"] if i is None else p[f"{key}/{n}"][i] for n in ("scale", "bias"))
        var = x.var(-1, unbiased=False, keepdim=True)
        y = (x - x.mean(-1, keepdim=True)) / torch.sqrt(var + cfg.vision.norm_eps) * s + b
        out16 = x16 and half[f"{key}/scale"] and half[f"{key}/bias"]
        return (r(y) if out16 else y), out16

    def add(x, x16, y, y16):
        return (r(x + y), True) if x16 and y16 else (x + y, False)

    batch, height, width, _ = image.shape
    pp = cfg.vision.patch_size
    g = image.reshape(batch, height // pp, pp, width // pp, pp, 3).permute(0, 1, 3, 2, 4, 5).flatten(3).flatten(1, 2)
    kernel = p["img/embedding/kernel"].reshape(-1, p["img/embedding/kernel"].shape[-1])  # HWIO -> [P P 3, Dv]
    x, x16 = dense(g, kernel, p["img/embedding/bias"], 1), True
    x, x16 = add(x, x16, p["img/pos_embedding"], half["img/pos_embedding"])
    blk = "img/Transformer/encoderblock"
    for i in range(len(p[f"{blk}/LayerNorm_0/scale"])):
        y, _ = norm(x, x16, f"{blk}/LayerNorm_0", i)
        a = f"{blk}/MultiHeadDotProductAttention_0"
        q, k, v = (dense(y, p[f"{a}/{n}/kernel"][i], p[f"{a}/{n}/bias"][i], 1) for n in ("query", "key", "value"))
        depth = q.shape[-1]
        q = r(q / r(torch.tensor(depth, dtype=q.dtype).sqrt()))
        s = r(torch.einsum("btnh,bsnh->bnts", q, k))
        e = r(torch.exp(r(s - s.max(-1, keepdim=True).values)))
        o = r(torch.einsum("bnts,bsnh->btnh", r(e / r(e.sum(-1, keepdim=True))), v))
        x, x16 = add(x, x16, dense(o, p[f"{a}/out/kernel"][i], p[f"{a}/out/bias"][i], 2), True)
        y, _ = norm(x, x16, f"{blk}/LayerNorm_1", i)
        m = f"{blk}/MlpBlock_0"
        y = r(F.gelu(dense(y, p[f"{m}/Dense_0/kernel"][i], p[f"{m}/Dense_0/bias"][i], 1), approximate="tanh"))
        x, x16 = add(x, x16, dense(y, p[f"{m}/Dense_1/kernel"][i], p[f"{m}/Dense_1/bias"][i], 1), True)
    x, x16 = norm(x, x16, "img/Transformer/encoder_norm")
    if x16 and half["img/head/kernel"] and half["img/head/bias"]:  # float16 values: the bias is one already
        return r(r(torch.tensordot(x, p["img/head/kernel"], 1)) + p["img/head/bias"])
    return torch.tensordot(x, p["img/head/kernel"], 1) + p["img/head/bias"]


def reference_step(cfg, params, options, inputs):
    """The float64 step of `options` with big_vision's ViT by hand (`reference_image_tokens`) in place of the
    model's: frozen leaves rounded by hand under --frozen-dtype float16 (`hand_rounded`), the LLM and the loss the
    float64 torch step (a float32 LLM on float16-rounded weights, as big_vision's)."""
    trainable = training.trainable_leaves(options, params)
    f16 = options.frozen_dtype == "float16"
    model = _float64_torch(cfg, PRESETS["big_vision"], hand_rounded(cfg, params, trainable if f16 else params))
    named = dict(model.named_parameters())
    p = {
        e.key: [named[n] for n in torch_names(e.key, e.layers)] if e.layers else named[torch_names(e.key, None)[0]]
        for e in spec.entries(cfg)
        if e.key.startswith("img/")
    }
    half = {k: f16 and k not in trainable for k in p}
    model.embed_image = lambda image, *_, **__: reference_image_tokens(p, half, image, cfg)
    return torch_api.train_step(
        model, inputs, dataclasses.replace(options, frozen_dtype="float32", vit_matmul_dtype="float32")
    )


def _vit_dtypes(api, cfg, options) -> dict[str, str]:
    """The dtypes of the ViT's points (patch embedding, + position embedding, block 0's attention branch and
    residual stream, encoder norm, projector) inside a step of `options`: the step's own float16 leaves and
    dtype_mm."""
    names = training.trainable_leaves(options, [e.key for e in spec.entries(cfg)])
    want = [points.IMG_PATCH_EMBED, points.IMG_POS_EMBED, points.img_block_attn(0), points.img_block_out(0)]
    want += [points.IMG_FINAL_NORM, points.PROJECTOR]
    out, model = {}, build(api, cfg)
    if api is torch_api:
        image = torch_train._batch(model, train_inputs(cfg))["image"]
        with torch.no_grad(), torch_train._half(model, torch_train._leaves(model, names), options):
            model.embed_image(image, want, out, dtype_mm={"float16": torch.float16}.get(options.vit_matmul_dtype))
    else:
        image = jax_train._batch(model, train_inputs(cfg))["image"]
        graphdef, leaves, frozen = jax_train._leaves(model, names)
        half = nnx.merge(graphdef, leaves, jax_train._half(frozen, options))
        half.embed_image(image, want, out, dtype_mm={"float16": jax.numpy.float16}.get(options.vit_matmul_dtype))
    return {k: str(out[k].dtype).removeprefix("torch.") for k in want}


# Trained ViT leaves beside frozen float16 ones: the frozen position embedding keeps the residual stream float16; a
# trained LayerNorm_1 returns float32 into the MLP's float16 cast; the trained projector promotes to float32.
MIXED = (
    "llm/layers/attn/*",
    "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/*",
    "img/Transformer/encoderblock/LayerNorm_1/*",
    "img/head/*",
)
F32_VIT = ["float16", "float32", "float16", "float32", "float32", "float32"]  # float32 position embedding
CASES = {  # options: big_vision's dtypes at _vit_dtypes' points, by its promotion rules (docs/training.md §5)
    "frozen": (VIT16, ["float16"] * 6),
    "all": (dataclasses.replace(VIT16, trainable=("all",)), F32_VIT),
    "mixed": (dataclasses.replace(VIT16, trainable=MIXED), ["float16"] * 5 + ["float32"]),
    "norm": (  # a trained encoder norm returns float32 into the frozen float16 projector, which promotes
        dataclasses.replace(VIT16, trainable=("img/Transformer/encoder_norm/*",)),
        ["float16"] * 4 + ["float32"] * 2,
    ),
    "float32-frozen": (dataclasses.replace(VIT16, frozen_dtype="float32"), F32_VIT),
}


@pytest.mark.parametrize("api", [torch_api, jax_api], ids=["torch", "jax"])
def test_float16_vit_dtypes_follow_the_leaves_as_in_big_vision(api):
    """The cast sites themselves: the image, patch conv, attention and MLP in float16 whatever the leaves; the
    position-embedding add, residual adds, LayerNorms and projector in the promotion of their operands, so float32
    from a float32 leaf on."""
    cfg = TINY_VARIANTS["tiny-pg2-gqa"]
    for name, (options, want) in CASES.items():
        assert list(_vit_dtypes(api, cfg, options).values()) == want, name


@pytest.mark.parametrize("case", ["frozen", "all", "mixed", "float32-frozen"])
def test_float16_vit_torch_jax_and_the_float64_reference_within_the_profile(case):
    """--vit-matmul-dtype float16 with a frozen float16 ViT (the guide) and where the ViT holds float32 leaves
    (trained, or frozen in float32): torch, jax and the float64 step on big_vision's cast sites by hand
    (reference_step) within the profile of one another, the
    float16 ViT visibly moving the gradients from the float16-weights-only step (from the float32 step with
    float32 frozen leaves). A float32 leaf that a Dense/Conv casts to float16 gets the float16 gradient cast back,
    a float16 value; a LayerNorm's or the promoted projector's gets a float32 one."""
    cfg, (vit16, _) = TINY_VARIANTS["tiny-pg1-mqa"], CASES[case]  # D = 64: the embedding product is exact
    params, half = spec.random_params(cfg, seed=1), dataclasses.replace(vit16, vit_matmul_dtype="float32")
    t16, j16 = run(torch_api, cfg, vit16, params), run(jax_api, cfg, vit16, params)
    effect = np.maximum(
        distance(t16, run(torch_api, cfg, half, params)), distance(j16, run(jax_api, cfg, half, params))
    )
    assert effect[1] > VISIBLE, effect
    ref = reference_step(cfg, params, vit16, train_inputs(cfg, seed=6))
    spread = {
        n: np.asarray(distance(a, b)) / effect
        for n, a, b in [("t-j", t16, j16), ("t-ref", t16, ref), ("j-ref", j16, ref)]
    }
    assert all((s <= PROFILE_TORCH_JAX).all() for s in spread.values()), spread
    cast = ("img/embedding/", "MultiHeadDotProductAttention_0/", "MlpBlock_0/")
    for result in (t16, j16, ref):
        for k, g in result.grads.items():
            if k.startswith("img/"):
                is16 = np.array_equal(g.astype(np.float16).astype(np.float32), g)
                assert is16 == any(c in k for c in cast), (k, is16)
    print(f"{case}: effect {effect}, " + ", ".join(f"{n} {s[0]:.2f} {s[1]:.2f}" for n, s in spread.items()))
