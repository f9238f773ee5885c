"""The fine-tuning step (issue 22) against independent computations: central finite differences in float64, the
numpy reference loss on forward logits, torch vs jax on every tiny config under both presets, and properties of
the loss and the update (hypothesis)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from torch_fixtures import make_inputs

from parity import spec, training
from parity.config import TINY_VARIANTS
from parity.conventions import PRESETS, Conventions, with_settings
from parity.errors import InputsError
from parity.jax_impl import api as jax_api
from parity.jax_impl import train as jax_train
from parity.jax_impl.load import _flat
from parity.jax_impl.load import state_to_canonical as jax_state_to_canonical
from parity.torch_impl import api as torch_api
from parity.torch_impl import train as torch_train
from parity.torch_impl.load import load_canonical, state_to_canonical
from parity.torch_impl.model import PaliGemma
from parity.training import TrainOptions

ROOT = Path(__file__).resolve().parents[1]
CFG = TINY_VARIANTS["tiny-pg2-gqa"]
ALL = TrainOptions(trainable=("all",), steps=1)
KEY_BIAS = "MultiHeadDotProductAttention_0/key/bias"  # an exactly-zero true gradient (softmax shift invariance)


def train_inputs(cfg, seed: int = 0, **kw) -> dict[str, np.ndarray]:
    """make_inputs plus mask_loss: 1 on the suffix (mask_ar 1) tokens that are real (mask_input 1)."""
    inputs = make_inputs(cfg, seed=seed, **kw)
    inputs["mask_loss"] = (inputs["mask_ar"] * inputs["mask_input"]).astype(np.int32)
    return inputs


def build(api, cfg, preset="big_vision", seed=1, conventions=None):
    conv = conventions or PRESETS[preset]
    return api.build_model(cfg, conv, params=spec.random_params(cfg, seed=seed), precision="highest")


def scale_of(grads: dict[str, np.ndarray], key: str) -> float:
    """What a gradient difference of `key` is judged against: its own max |g|, or the global gradient scale for
    the ViT key bias (its true gradient is exactly zero: its float32 value is rounding noise)."""
    if key.endswith(KEY_BIAS):
        return max(float(np.abs(g).max()) for g in grads.values())
    return float(np.abs(grads[key]).max())


def test_train_files_define_the_same_things_in_the_same_order():
    from test_impls_mirror import _definitions

    torch_defs, jax_defs = (_definitions(ROOT / "parity" / impl / "train.py") for impl in ("torch_impl", "jax_impl"))
    assert (
        torch_defs
        == jax_defs
        == [
            "train_step",
            "_batch",
            "_leaves",
            "_half",
            "_text_embedding",
            "_value_and_grad",
            "_loss",
            "_norms",
            "_sgd",
            "_canonical",
        ]
    )


# -- conventions ---------------------------------------------------------------------------------------------------
def test_new_conventions_load_old_records_and_parse_from_set():
    old = {k: v for k, v in PRESETS["big_vision"].to_dict().items() if k not in ("loss_normalization", "train_prefix")}
    assert Conventions.from_dict(old) == PRESETS["big_vision"]
    assert PRESETS["big_vision"].loss_normalization == PRESETS["keras_hub"].loss_normalization == "per_example"
    assert PRESETS["transformers"].loss_normalization == "per_token"
    c = with_settings(PRESETS["big_vision"], ["loss_normalization=per_token", "train_prefix=causal"])
    assert (c.loss_normalization, c.train_prefix) == ("per_token", "causal")
    with pytest.raises(ValueError, match="loss_normalization"):
        with_settings(PRESETS["big_vision"], ["loss_normalization=mean"])


def test_missing_mask_loss_is_refused():
    model = build(torch_api, CFG)
    inputs = train_inputs(CFG)
    del inputs["mask_loss"]
    with pytest.raises(InputsError, match="parity inputs --suffix"):
        torch_api.train_step(model, inputs, ALL)


# -- (a) finite differences in float64 -----------------------------------------------------------------------------
def _float64_torch(cfg, conv, params):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = PaliGemma(cfg, conv)
    finally:
        torch.set_default_dtype(previous)
    load_canonical(model, {k: v.astype(np.float64) for k, v in params.items()})
    model.precision = "highest"
    return model


@pytest.mark.parametrize("preset", ["big_vision", "transformers"])
def test_torch_gradients_match_central_differences_in_float64(preset):
    params = spec.random_params(CFG, seed=3)
    inputs = train_inputs(CFG, seed=2, length=(14, 10), prefix=(3, 6))
    model = _float64_torch(CFG, PRESETS[preset], params)
    grads = torch_api.train_step(model, inputs, dataclasses.replace(ALL, lr=0.0)).grads
    assert set(grads) == {e.key for e in spec.entries(CFG)}  # every leaf
    batch = torch_train._batch(model, inputs)
    named = dict(model.named_parameters())
    eps, worst = 1e-5, 0.0
    for e in spec.entries(CFG):
        g = grads[e.key]
        for flat in (int(np.abs(g).argmax()),):
            idx = np.unravel_index(flat, g.shape)
            layer, rest = (idx[0], idx[1:]) if e.layers is not None else (None, idx)
            name = e.key.replace("/", ".") if layer is None else torch_train.torch_names(e.key, e.layers)[layer]
            p = named[name]
            with torch.no_grad():
                old = p[rest].item()
                losses = []
                for step in (eps, -eps):
                    p[rest] = old + step
                    losses.append(float(torch_train._loss(model, batch)[0]))
                p[rest] = old
            fd = (losses[0] - losses[1]) / (2 * eps)
            err = abs(fd - float(g[idx])) / max(scale_of(grads, e.key), 1e-12)
            worst = max(worst, err)
            assert err < 1e-6, (e.key, idx, fd, g[idx])  # float32 copies of float64 gradients: ~6e-8 of the scale
    print(f"torch FD {preset}: worst {worst:.1e} of the leaf's max |g|")


JAX_FD = r"""
import numpy as np, jax, jax.numpy as jnp, sys
from flax import nnx
sys.path.insert(0, "tests")
from test_train_step import CFG, train_inputs, scale_of
from parity import spec
from parity.conventions import PRESETS
from parity.jax_impl import api, train
from parity.jax_impl.load import _flat, _nest, place
from parity.jax_impl.model import PaliGemma
from parity.training import TrainOptions
assert jax.config.jax_enable_x64
params = spec.random_params(CFG, seed=3)
inputs = train_inputs(CFG, seed=2, length=(14, 10), prefix=(3, 6))
worst = 0.0
for preset in ("transformers",):
    abstract = nnx.eval_shape(lambda: PaliGemma(CFG, PRESETS[preset]))
    module = place(abstract, {k: jnp.asarray(v, jnp.float64) for k, v in params.items()})
    model = api.Model(module, "float32", "cpu:0", "highest")
    grads = api.train_step(model, inputs, TrainOptions(trainable=("all",), lr=0.0)).grads
    batch = train._batch(model, inputs)
    graphdef, leaves, frozen = train._leaves(model, [e.key for e in spec.entries(CFG)])
    flat = _flat(nnx.to_pure_dict(leaves))
    eps = 1e-5
    loss = jax.jit(lambda t: train._loss(nnx.merge(graphdef, t, frozen), batch)[0])
    for e in spec.entries(CFG):
        g = grads[e.key]
        for f in (int(np.abs(g).argmax()),):
            idx = np.unravel_index(f, g.shape)
            losses = []
            for step in (eps, -eps):
                moved = dict(flat)
                moved[e.key] = flat[e.key].at[idx].add(step)
                nnx.replace_by_pure_dict(leaves, _nest(moved))
                losses.append(float(loss(leaves)))
            nnx.replace_by_pure_dict(leaves, _nest(flat))
            err = abs((losses[0] - losses[1]) / (2 * eps) - float(g[idx])) / max(scale_of(grads, e.key), 1e-12)
            worst = max(worst, err)
            assert err < 1e-6, (preset, e.key, idx, err)
print(f"jax FD: worst {worst:.1e}")
"""


def test_jax_gradients_match_central_differences_in_float64():
    """jax needs x64 from the start: a subprocess with JAX_ENABLE_X64=1."""
    env = {**os.environ, "JAX_ENABLE_X64": "1", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", JAX_FD], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    print(out.stdout.strip())


# -- (b) the step's loss is the reference loss of the forward logits --------------------------------------------
_LOGITS: dict = {}


def _forward_logits(preset, shifted) -> np.ndarray:
    """torch's forward logits, once per preset: the numpy reference loss of both implementations' steps is computed
    from them (for jax, from the other implementation's forward, which saves compiling jax's forward here)."""
    if preset not in _LOGITS:
        _LOGITS[preset] = torch_api.forward(build(torch_api, CFG, preset), shifted)["logits"]
    return _LOGITS[preset]


@pytest.mark.parametrize("preset", ["big_vision", "transformers"])
@pytest.mark.parametrize("api", [torch_api, jax_api], ids=["torch", "jax"])
def test_step_loss_is_the_reference_loss_of_forward_logits(api, preset):
    inputs = train_inputs(CFG, seed=4)
    inputs["mask_loss"][1, 5:] = 0  # rows with different loss-token counts: the normalisations differ
    shifted = {"image": inputs["image"], "text": inputs["text"][:, :-1], "mask_ar": inputs["mask_ar"][:, :-1]}
    logits = _forward_logits(preset, shifted)
    want, want_rows = training.reference_loss(logits, inputs, PRESETS[preset])
    got = api.train_step(build(api, CFG, preset), inputs, ALL).steps[0]
    assert abs(got.loss - want) <= 1e-6 * abs(want)
    np.testing.assert_allclose(got.example_loss, want_rows, rtol=1e-6)
    other = "per_token" if preset == "big_vision" else "per_example"
    assert (
        abs(
            training.reference_loss(logits, inputs, with_settings(PRESETS[preset], [f"loss_normalization={other}"]))[0]
            - want
        )
        > 1e-4
    )


# -- (c) torch vs jax -------------------------------------------------------------------------------------------
ATTN = TrainOptions(steps=3)
CASES = [(c, p, dataclasses.replace(ALL, steps=3)) for c in TINY_VARIANTS for p in ("big_vision", "transformers")]
CASES += [("tiny-pg2-gqa", "big_vision", ATTN), ("tiny-pg1-mqa", "transformers", ATTN)]


@pytest.mark.parametrize(("variant", "preset", "options"), CASES, ids=lambda x: getattr(x, "trainable", x))
def test_torch_and_jax_take_the_same_steps(variant, preset, options):
    cfg, inputs = TINY_VARIANTS[variant], train_inputs(TINY_VARIANTS[variant], seed=6)
    a = torch_api.train_step(build(torch_api, cfg, preset), inputs, options)
    b = jax_api.train_step(build(jax_api, cfg, preset), inputs, options)
    assert set(a.grads) == set(b.grads) == set(training.trainable_leaves(options, [e.key for e in spec.entries(cfg)]))
    for x, y in zip(a.steps, b.steps, strict=True):
        assert abs(x.loss - y.loss) <= 1e-5 * abs(x.loss)
        np.testing.assert_allclose(x.example_loss, y.example_loss, rtol=1e-5)
    worst = max(float(np.abs(a.grads[k] - b.grads[k]).max()) / scale_of(a.grads, k) for k in a.grads)
    assert worst <= 3e-5
    for k in a.params:
        assert np.abs(a.params[k] - b.params[k]).max() <= 1e-6 * max(1.0, float(np.abs(a.params[k]).max())), k
    assert a.steps[-1].loss < a.steps[0].loss  # SGD descends
    rel = abs(a.steps[0].loss - b.steps[0].loss) / a.steps[0].loss
    print(f"{variant} {preset} {options.trainable}: loss {rel:.1e}, grads {worst:.1e}")


def test_causal_prefix_convention_changes_the_loss_alike_in_torch_and_jax():
    causal = with_settings(PRESETS["transformers"], ["train_prefix=causal"])
    inputs = train_inputs(CFG, seed=7)
    a = torch_api.train_step(build(torch_api, CFG, conventions=causal), inputs, ALL)
    b = jax_api.train_step(build(jax_api, CFG, conventions=causal), inputs, ALL)
    bidirectional = torch_api.train_step(build(torch_api, CFG, "transformers"), inputs, ALL)
    assert abs(a.steps[0].loss - b.steps[0].loss) <= 1e-5 * a.steps[0].loss
    assert abs(a.steps[0].loss - bidirectional.steps[0].loss) > 1e-4
    assert max(float(np.abs(a.grads[k] - b.grads[k]).max()) / scale_of(a.grads, k) for k in a.grads) <= 3e-5


# -- (d) properties ------------------------------------------------------------------------------------------------
def _loss(inputs, conventions=PRESETS["big_vision"], model=None):
    model = model or build(torch_api, CFG, conventions=conventions)
    return torch_api.train_step(model, inputs, TrainOptions(lr=0.0)).steps[0]


@settings(max_examples=4, deadline=None)
@given(extra=st.integers(1, 4), seed=st.integers(0, 100), preset=st.sampled_from(["big_vision", "transformers"]))
def test_loss_ignores_extra_padding_columns_and_row_order(extra, seed, preset):
    inputs = train_inputs(CFG, seed=seed)
    base = _loss(inputs, PRESETS[preset])
    padded = {k: np.pad(v, ((0, 0), (0, extra))) if k != "image" else v for k, v in inputs.items()}
    assert abs(_loss(padded, PRESETS[preset]).loss - base.loss) <= 1e-6 * base.loss
    order = np.random.default_rng(seed).permutation(len(inputs["text"]))
    swapped = _loss({k: v[order] for k, v in inputs.items()}, PRESETS[preset])
    assert abs(swapped.loss - base.loss) <= 1e-6 * base.loss
    np.testing.assert_allclose(swapped.example_loss, np.asarray(base.example_loss)[order], rtol=1e-6)


@settings(max_examples=4, deadline=None)
@given(count=st.integers(1, 4), seed=st.integers(0, 100))
def test_normalisations_agree_when_every_row_has_as_many_loss_tokens(count, seed):
    inputs = train_inputs(CFG, seed=seed)
    inputs["mask_loss"][:] = 0
    inputs["mask_loss"][:, 10 - count : 10] = 1  # every row holds >= 10 real tokens
    a = _loss(inputs, PRESETS["big_vision"])
    b = _loss(inputs, with_settings(PRESETS["big_vision"], ["loss_normalization=per_token"]))
    assert abs(a.loss - b.loss) <= 1e-6 * a.loss


@settings(max_examples=3, deadline=None)
@given(steps=st.integers(1, 3), api=st.sampled_from([torch_api, jax_api]))
def test_lr_zero_and_frozen_leaves_stay_bit_identical(steps, api):
    inputs = train_inputs(CFG)
    canonical = state_to_canonical if api is torch_api else jax_state_to_canonical
    for options in (TrainOptions(trainable=("all",), steps=steps, lr=0.0), TrainOptions(steps=steps, lr=0.1)):
        model = build(api, CFG)
        before = canonical(model if api is torch_api else model.module)
        result = api.train_step(model, inputs, options)
        after = canonical(model if api is torch_api else model.module)
        moved = {k for k in before if not np.array_equal(before[k], after[k])}
        assert moved == (set() if options.lr == 0 else set(result.params)), moved
        for k in result.params:
            np.testing.assert_array_equal(result.params[k], after[k])


def test_frozen_gradients_are_never_materialised():
    model = build(torch_api, CFG)
    result = torch_api.train_step(model, train_inputs(CFG), TrainOptions(steps=2))
    trainable = set(result.grads)
    assert trainable and all(k.startswith("llm/layers/attn/") for k in trainable)
    for name, p in model.named_parameters():
        assert p.grad is None, name  # autograd.grad: no .grad anywhere
        assert p.requires_grad == (name.startswith("llm.layers.") and ".attn." in name), name
    jmodel = build(jax_api, CFG)
    graphdef, leaves, frozen = jax_train._leaves(jmodel, sorted(trainable))
    _, grads = jax_train._value_and_grad(graphdef, leaves, frozen, jax_train._batch(jmodel, train_inputs(CFG)))
    assert set(_flat(nnx.to_pure_dict(grads))) == trainable


def test_a_row_without_loss_tokens_contributes_zero_and_is_reported():
    inputs = train_inputs(CFG, seed=8)
    inputs["mask_loss"][1] = 0
    step = _loss(inputs)
    full = _loss(train_inputs(CFG, seed=8))
    assert step.example_loss[1] == 0.0
    assert abs(step.loss - (step.example_loss[0] + step.example_loss[2]) / 3) <= 1e-6 * step.loss
    np.testing.assert_allclose(
        [step.example_loss[0], step.example_loss[2]], [full.example_loss[0], full.example_loss[2]], rtol=1e-6
    )
    model = build(torch_api, CFG)
    assert torch_api.train_step(model, inputs, TrainOptions()).empty_rows == [1]


@pytest.mark.parametrize("api", [torch_api, jax_api], ids=["torch", "jax"])
def test_a_nan_weight_is_reported_as_the_first_nonfinite_step(api):
    params = spec.random_params(CFG, seed=1)
    params["llm/final_norm/scale"] = params["llm/final_norm/scale"].copy()
    params["llm/final_norm/scale"][0] = np.nan
    model = api.build_model(CFG, PRESETS["big_vision"], params=params)
    result = api.train_step(model, train_inputs(CFG), TrainOptions(steps=2))
    assert result.first_nonfinite() == "step 1: loss nan"
