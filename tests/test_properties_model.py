"""Hypothesis properties of a whole tiny model, for both implementations: appending padding to a row changes no
logit of its real tokens; permuting the rows of a batch permutes the outputs; the KV-cache decode steps equal the
full forward pass at those positions. Shapes stay fixed (text length 8, or 12 with the appended padding) so that
jax compiles each once; the models are built once per implementation and preset."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parity import spec
from parity.config import TINY_VARIANTS
from parity.conventions import PRESETS
from parity.jax_impl import api as jax_api
from parity.torch_impl import api as torch_api

CFG = TINY_VARIANTS["tiny-pg2-gqa"]  # window 8 < 16 image + 8 text tokens: the local layers are windowed
IMPLS = {"torch": torch_api, "jax": jax_api}
L, PAD, B, NEW = 8, 4, 3, 4
TOL = 1e-5
SETTINGS = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@functools.cache
def model(impl: str, preset: str, **changes):
    conv = dataclasses.replace(PRESETS[preset], **changes)
    return IMPLS[impl].build_model(CFG, conv, params=spec.random_params(CFG, seed=7))


@st.composite
def batches(draw, b=B, length=L):
    """Rows of random tokens: <bos>, a prefix, a causal suffix, right padding (lengths differ per row)."""
    text = np.zeros((b, length), np.int32)
    mask_ar = np.ones((b, length), np.int32)
    mask_input = np.zeros((b, length), np.int32)
    for r in range(b):
        n = draw(st.integers(2, length))
        prefix = draw(st.integers(1, n))
        text[r, :n] = draw(st.lists(st.integers(3, CFG.text.vocab_size - 1), min_size=n, max_size=n))
        text[r, 0] = 2
        mask_ar[r, :prefix] = 0
        mask_input[r, :n] = 1
    seed = draw(st.integers(0, 2**31 - 1))
    image = np.random.default_rng(seed).uniform(-1, 1, (b, 28, 28, 3)).astype(np.float32)
    return dict(image=image, text=text, mask_ar=mask_ar, mask_input=mask_input)


def logits(impl, preset, inputs):
    return IMPLS[impl].forward(model(impl, preset), inputs)["logits"]


def real(inputs) -> np.ndarray:
    """bool[B, S]: real positions of [image ; text]."""
    t = CFG.num_image_tokens
    return np.concatenate([np.ones((inputs["text"].shape[0], t), bool), inputs["mask_input"].astype(bool)], 1)


def rel(a, b) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


each = pytest.mark.parametrize("impl", list(IMPLS))
presets = pytest.mark.parametrize("preset", list(PRESETS))


@each
@presets
@SETTINGS
@given(inputs=batches())
def test_appended_padding_changes_no_real_logit(impl, preset, inputs):
    padded = {
        k: v if k == "image" else np.pad(v, ((0, 0), (0, PAD)), constant_values=1 if k == "mask_ar" else 0)
        for k, v in inputs.items()
    }
    a, b = logits(impl, preset, inputs), logits(impl, preset, padded)
    t, valid = CFG.num_image_tokens, real(inputs)
    assert rel(b[:, : t + L][valid], a[valid]) <= TOL


@each
@presets
@SETTINGS
@given(inputs=batches(), perm=st.permutations(range(B)))
def test_permuting_rows_permutes_outputs(impl, preset, inputs, perm):
    perm = np.array(perm)
    a = logits(impl, preset, inputs)
    b = logits(impl, preset, {k: v[perm] for k, v in inputs.items()})
    valid = real(inputs)[perm]
    assert rel(b[valid], a[perm][valid]) <= TOL


@each
@pytest.mark.parametrize("preset", ["transformers", "keras_hub", "big_vision"])
@SETTINGS
@given(inputs=batches())
def test_decode_steps_equal_the_full_forward(impl, preset, inputs):
    """Greedy decode of prefix-only prompts, then one forward pass over prompt + generated tokens (those as a
    causal suffix): its logits at each row's positions n - 1 + t are the decode step logits t. The final softcap is
    taken as `always` (big_vision caps only decode steps, by design)."""
    inputs = dict(inputs, mask_ar=np.zeros_like(inputs["mask_ar"]))
    api, m = IMPLS[impl], model(impl, preset, final_softcap="always")
    gen = api.generate(m, inputs, NEW, ignore_eos=True, return_logits=True)
    text = np.zeros((B, L + NEW), np.int32)
    mask_ar, mask_input = np.ones_like(text), np.zeros_like(text)
    n = inputs["mask_input"].sum(1)
    for r in range(B):
        text[r, : n[r]] = inputs["text"][r, : n[r]]
        text[r, n[r] : n[r] + NEW] = gen["tokens"][r]
        mask_ar[r, : n[r]] = 0
        mask_input[r, : n[r] + NEW] = 1
    full = api.forward(m, dict(image=inputs["image"], text=text, mask_ar=mask_ar, mask_input=mask_input))["logits"]
    t = CFG.num_image_tokens
    for r in range(B):
        want = full[r, t + n[r] - 1 + np.arange(NEW)]
        assert rel(gen["logits"][r], want) <= TOL, (r, rel(gen["logits"][r], want))
