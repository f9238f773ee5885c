"""Hypothesis property tests of the mask, sliding-window, RoPE and softcap math of both implementations, each
against a formula written out independently here (loops over the definitions, float64 numpy, complex rotations).

Each test runs once per implementation (`IMPLS`: numpy in, numpy out); jax runs under `jax.enable_x64` so that the
float64 checks mean the same for both (RoPE angles stay float32 by design in both)."""
import contextlib
import functools
import types

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st


def _torch_impl():
    import torch

    from parity.torch_impl import attention as a
    t = torch.as_tensor
    return types.SimpleNamespace(
        context=contextlib.nullcontext,
        positions_from_mask=lambda m, o: a.positions_from_mask(t(m), o).numpy(),
        prefix_lm_mask=lambda inp, ar: a.prefix_lm_mask(t(inp), t(ar)).numpy(),
        same_block=lambda ar: a.same_block(t(ar)).numpy(),
        sliding_window_mask=lambda m, q, k, w, bi: a.sliding_window_mask(t(m), t(q), t(k), w, t(bi)).numpy(),
        rope=lambda x, pos, base: a.rope(t(x), t(pos), base).numpy(),
        softcap=lambda x, cap: a.softcap(t(x), cap).numpy())


def _jax_impl():
    import functools

    import jax
    import jax.numpy as jnp

    from parity.jax_impl import attention as a
    jit = functools.partial(jax.jit, static_argnums=(1,))  # one compilation per shape, not one per op
    pos, sw = jit(a.positions_from_mask), jax.jit(a.sliding_window_mask, static_argnums=(3,))
    rope, cap = jax.jit(a.rope, static_argnums=(2,)), jit(a.softcap)
    mask, block = jax.jit(a.prefix_lm_mask), jax.jit(a.same_block)
    j = jnp.asarray
    return types.SimpleNamespace(
        context=lambda: jax.enable_x64(True),
        positions_from_mask=lambda m, o: np.asarray(pos(j(m), o)),
        prefix_lm_mask=lambda inp, ar: np.asarray(mask(j(inp), j(ar))),
        same_block=lambda ar: np.asarray(block(j(ar))),
        sliding_window_mask=lambda m, q, k, w, bi: np.asarray(sw(j(m), j(q), j(k), w, j(bi))),
        rope=lambda x, p, base: np.asarray(rope(j(x), j(p), base)),
        softcap=lambda x, c: np.asarray(cap(j(x), c)))


IMPLS = {"torch": functools.lru_cache(_torch_impl), "jax": functools.lru_cache(_jax_impl)}
each_impl = pytest.mark.parametrize("impl", list(IMPLS))


@st.composite
def rows(draw, max_len=12):
    """A batch of (mask_ar, input_mask) rows: a prefix (0s), a suffix (1s), then right padding."""
    b = draw(st.integers(1, 3))
    n = draw(st.integers(1, max_len))
    ar, inp = [], []
    for _ in range(b):
        prefix = draw(st.integers(1, n))
        suffix = draw(st.integers(0, n - prefix))
        pad = n - prefix - suffix
        ar.append([0] * prefix + [1] * suffix + [1] * pad)
        inp.append([1] * (prefix + suffix) + [0] * pad)
    return np.array(ar), np.array(inp)


@each_impl
@settings(max_examples=80, deadline=None)
@given(batch=rows())
def test_prefix_lm_mask_is_the_definition(impl, batch):
    f = IMPLS[impl]()
    ar, inp = batch
    with f.context():
        got = f.prefix_lm_mask(inp, ar)
    b, n = ar.shape
    for r in range(b):
        prefix = int((ar[r] == 0).sum())
        for i in range(n):
            for j in range(n):
                real = inp[r, i] and inp[r, j]
                # prefix tokens see the whole prefix; suffix token i also sees suffix tokens j <= i
                want = real and (j < prefix or (i >= prefix and j <= i))
                assert got[r, i, j] == want, (r, i, j)


@each_impl
@settings(max_examples=60, deadline=None)
@given(batch=rows(max_len=14), window=st.integers(1, 6))
def test_sliding_window_is_the_transformers_rule(impl, batch, window):
    f = IMPLS[impl]()
    ar, inp = batch
    with f.context():
        mask = f.prefix_lm_mask(inp, ar)
        pos = f.positions_from_mask(inp, 0)
        got = f.sliding_window_mask(mask, pos, pos, window, f.same_block(ar) & mask)
    b, n = ar.shape
    for r in range(b):
        prefix = int((ar[r] == 0).sum())
        for i in range(n):
            for j in range(n):
                in_prefix_block = i < prefix and j < prefix
                want = bool(mask[r, i, j]) and (in_prefix_block or i - j < window)
                assert got[r, i, j] == want, (r, i, j, window)


@each_impl
@settings(max_examples=60, deadline=None)
@given(p=st.integers(0, 3000), s=st.integers(0, 3000), h=st.sampled_from([4, 8, 16, 64]),
       seed=st.integers(0, 2**31 - 1))
def test_rope_is_a_complex_rotation_and_relative(impl, p, s, h, seed):
    f = IMPLS[impl]()
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(h)
    k = rng.standard_normal(h)
    theta = 10000.0 ** (-np.arange(h // 2) * 2 / h)

    def rot64(x, pos):  # half-split pairs (x_i, x_{i+H/2}) as complex numbers times e^{i pos theta}
        z = (x[: h // 2] + 1j * x[h // 2:]) * np.exp(1j * pos * theta)
        return np.concatenate([z.real, z.imag])

    def ours(x, pos):
        with f.context():
            return f.rope(x.reshape(1, 1, 1, h), np.array([[pos]]), 10000.0).reshape(h)

    # Angles are float32 by design (transformers' formula), so they carry ~6e-8 relative error: tolerances scale
    # with the position; the float64 rotation itself is exact.
    np.testing.assert_allclose(ours(q, p), rot64(q, p), atol=2e-7 * max(1, p) * np.abs(q).max())
    np.testing.assert_allclose(np.linalg.norm(ours(q, p)), np.linalg.norm(q), rtol=1e-6)  # float32 cos/sin
    # attention logits depend only on p - s
    np.testing.assert_allclose(ours(q, p) @ ours(k, s), rot64(q, p - s) @ k,
                               atol=4e-7 * max(1, p, s) * np.linalg.norm(q) * np.linalg.norm(k))


@each_impl
@settings(max_examples=100, deadline=None)
@given(xs=st.lists(st.floats(-1e4, 1e4, allow_nan=False), min_size=1, max_size=50), cap=st.sampled_from([30.0, 50.0]))
def test_softcap_bounds_monotone_and_identity_near_zero(impl, xs, cap):
    f = IMPLS[impl]()
    x = np.array(sorted(xs), dtype=np.float64)
    with f.context():
        y = f.softcap(x, cap)
        small = x[np.abs(x) < 1e-3]
        y_small = f.softcap(small, cap)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, cap * np.tanh(x / cap), rtol=1e-12, atol=1e-12)
    assert (np.abs(y) <= cap).all()
    assert (y[1:] >= y[:-1]).all()
    np.testing.assert_allclose(y_small, small, rtol=1e-6, atol=1e-300)
