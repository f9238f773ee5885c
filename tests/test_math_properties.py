"""Hypothesis property tests of the mask, sliding-window, RoPE, softcap and norm math of both implementations, each
against a formula written out independently here (loops over the definitions, float64 numpy, complex rotations)
or an invariance the math must have. (Whole-model properties: test_properties_model.py.)

Each test runs once per implementation (`IMPLS`: numpy in, numpy out); jax runs under `jax.enable_x64` so that the
float64 checks mean the same for both (RoPE angles stay float32 by design in both)."""

import contextlib
import functools
import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st


def _torch_impl():
    import torch

    from parity.torch_impl import attention as a
    from parity.torch_impl import decoder, vision

    t = torch.as_tensor

    def norm(module, x, **params):
        for name, value in params.items():
            getattr(module, name).data = t(value)
        return module(t(x)).numpy()

    return types.SimpleNamespace(
        context=contextlib.nullcontext,
        positions_from_mask=lambda m, o: a.positions_from_mask(t(m), o).numpy(),
        prefix_lm_mask=lambda inp, ar: a.prefix_lm_mask(t(inp), t(ar)).numpy(),
        same_block=lambda ar: a.same_block(t(ar)).numpy(),
        sliding_window_mask=lambda m, q, k, w, bi, rule="transformers": a.sliding_window_mask(
            t(m), t(q), t(k), w, t(bi), rule=rule
        ).numpy(),
        rope=lambda x, pos, base: a.rope(t(x), t(pos), base).numpy(),
        attend=lambda q, k, v, m, cap: a.attend(t(q), t(k), t(v), t(m), cap).numpy(),
        softcap=lambda x, cap: a.softcap(t(x), cap).numpy(),
        rms_norm=lambda x, scale, eps: norm(decoder.RMSNorm(len(scale), eps), x, scale=scale),
        layer_norm=lambda x, scale, bias, eps: norm(vision.LayerNorm(len(scale), eps), x, scale=scale, bias=bias),
    )


def _jax_impl():
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from parity.jax_impl import attention as a
    from parity.jax_impl import decoder, vision

    jit = functools.partial(jax.jit, static_argnums=(1,))  # one compilation per shape, not one per op
    pos, sw = jit(a.positions_from_mask), jax.jit(a.sliding_window_mask, static_argnums=(3, 5))
    rope, cap = jax.jit(a.rope, static_argnums=(2,)), jit(a.softcap)
    mask, block = jax.jit(a.prefix_lm_mask), jax.jit(a.same_block)
    attend = jax.jit(a.attend, static_argnums=(4,))
    j = jnp.asarray

    @functools.cache
    def module(kind, dim, eps):  # one module and one compiled call per kind and shape
        m = {"rms": decoder.RMSNorm, "layer": vision.LayerNorm}[kind](dim, eps)
        graphdef = nnx.graphdef(m)
        return m, jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))

    def norm(kind, x, eps, **params):
        m, run = module(kind, x.shape[-1], eps)
        for name, value in params.items():
            getattr(m, name)[...] = j(value)
        return np.asarray(run(nnx.state(m), j(x)))

    return types.SimpleNamespace(
        context=lambda: jax.enable_x64(True),
        positions_from_mask=lambda m, o: np.asarray(pos(j(m), o)),
        prefix_lm_mask=lambda inp, ar: np.asarray(mask(j(inp), j(ar))),
        same_block=lambda ar: np.asarray(block(j(ar))),
        sliding_window_mask=lambda m, q, k, w, bi, rule="transformers": np.asarray(
            sw(j(m), j(q), j(k), w, j(bi), rule)
        ),
        rope=lambda x, p, base: np.asarray(rope(j(x), j(p), base)),
        attend=lambda q, k, v, m, c: np.asarray(attend(j(q), j(k), j(v), j(m), c)),
        softcap=lambda x, c: np.asarray(cap(j(x), c)),
        rms_norm=lambda x, scale, eps: norm("rms", x, eps, scale=scale),
        layer_norm=lambda x, scale, bias, eps: norm("layer", x, eps, scale=scale, bias=bias),
    )


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
@settings(max_examples=40, deadline=None)
@given(batch=rows())
def test_prefix_lm_mask_rows_are_independent(impl, batch):
    """A row's mask is the same alone as in any batch."""
    f = IMPLS[impl]()
    ar, inp = batch
    with f.context():
        together = f.prefix_lm_mask(inp, ar)
        for r in range(ar.shape[0]):
            np.testing.assert_array_equal(together[r], f.prefix_lm_mask(inp[r : r + 1], ar[r : r + 1])[0])


def _window(f, ar, inp, window, rule):
    with f.context():
        mask = f.prefix_lm_mask(inp, ar)
        pos = f.positions_from_mask(inp, 0)
        return mask, f.sliding_window_mask(mask, pos, pos, window, f.same_block(ar) & mask, rule)


@each_impl
@pytest.mark.parametrize("rule", ["transformers", "keras_hub"])
@settings(max_examples=60, deadline=None)
@given(batch=rows(max_len=14), window=st.integers(1, 6))
def test_sliding_window_is_the_rule(impl, rule, batch, window):
    f = IMPLS[impl]()
    ar, inp = batch
    mask, got = _window(f, ar, inp, window, rule)
    b, n = ar.shape
    for r in range(b):
        prefix = int((ar[r] == 0).sum())
        for i in range(n):
            for j in range(n):
                if rule == "transformers":  # the prefix block exempt, else q - k < window
                    keep = (i < prefix and j < prefix) or i - j < window
                else:  # a symmetric band, nothing exempt
                    keep = abs(i - j) <= window - 1
                assert got[r, i, j] == (bool(mask[r, i, j]) and keep), (r, i, j, window)


@each_impl
@settings(max_examples=40, deadline=None)
@given(prefix=st.integers(1, 12), suffix=st.integers(0, 8), window=st.integers(1, 8), data=st.data())
def test_sliding_window_edges(impl, prefix, suffix, window, data):
    """The keys one query sees, as sets, at the window's edges under each convention (one unpadded row)."""
    f = IMPLS[impl]()
    n = prefix + suffix
    i = data.draw(st.integers(0, n - 1))
    ar, inp = np.array([[0] * prefix + [1] * suffix]), np.ones((1, n), np.int64)
    sees = lambda m: set(np.flatnonzero(m[0, i]).tolist())
    full, tf = _window(f, ar, inp, window, "transformers")
    _, kh = _window(f, ar, inp, window, "keras_hub")
    causal = set(range(prefix)) | set(range(prefix, i + 1)) if i >= prefix else set(range(prefix))
    assert sees(full) == causal  # "off": the prefix-LM mask itself
    lo = i - window + 1  # the oldest key a window keeps: i - (window - 1) in, i - window out
    assert sees(kh) == {j for j in causal if lo <= j <= i + window - 1}
    assert sees(tf) == (set(range(prefix)) if i < prefix else {j for j in causal if j >= lo})
    if i >= prefix:  # a suffix query: both references keep exactly the last `window` keys
        assert sees(tf) == sees(kh) == set(range(max(lo, 0), i + 1))


@each_impl
@settings(max_examples=60, deadline=None)
@given(
    p=st.integers(0, 3000), s=st.integers(0, 3000), h=st.sampled_from([4, 8, 16, 64]), seed=st.integers(0, 2**31 - 1)
)
def test_rope_is_a_complex_rotation_and_relative(impl, p, s, h, seed):
    f = IMPLS[impl]()
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(h)
    k = rng.standard_normal(h)
    theta = 10000.0 ** (-np.arange(h // 2) * 2 / h)

    def rot64(x, pos):  # half-split pairs (x_i, x_{i+H/2}) as complex numbers times e^{i pos theta}
        z = (x[: h // 2] + 1j * x[h // 2 :]) * np.exp(1j * pos * theta)
        return np.concatenate([z.real, z.imag])

    def ours(x, pos):
        with f.context():
            return f.rope(x.reshape(1, 1, 1, h), np.array([[pos]]), 10000.0).reshape(h)

    # Angles are float32 by design (transformers' formula), so they carry ~6e-8 relative error: tolerances scale
    # with the position; the float64 rotation itself is exact.
    np.testing.assert_allclose(ours(q, p), rot64(q, p), atol=2e-7 * max(1, p) * np.abs(q).max())
    np.testing.assert_allclose(np.linalg.norm(ours(q, p)), np.linalg.norm(q), rtol=1e-6)  # float32 cos/sin
    # attention logits depend only on p - s
    np.testing.assert_allclose(
        ours(q, p) @ ours(k, s), rot64(q, p - s) @ k, atol=4e-7 * max(1, p, s) * np.linalg.norm(q) * np.linalg.norm(k)
    )


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
    with f.context():
        np.testing.assert_array_equal(f.softcap(-x, cap), -y)  # odd
    np.testing.assert_allclose(y_small, small, rtol=1e-6, atol=1e-300)


@each_impl
@settings(max_examples=40, deadline=None)
@given(p=st.integers(-3000, 3000), h=st.sampled_from([4, 16, 64]), seed=st.integers(0, 2**31 - 1))
def test_rope_by_minus_theta_inverts_it(impl, p, h, seed):
    f = IMPLS[impl]()
    x = np.random.default_rng(seed).standard_normal((1, 1, 2, h))
    with f.context():
        back = f.rope(f.rope(x, np.array([[p]]), 10000.0), np.array([[-p]]), 10000.0)
    np.testing.assert_allclose(back, x, atol=1e-6 * np.abs(x).max())  # float32 cos/sin: rounding only


@each_impl
@settings(max_examples=30, deadline=None)
@given(batch=rows(max_len=10), shift=st.sampled_from([1, 7, 100]), seed=st.integers(0, 2**31 - 1))
def test_shifting_the_position_origin_changes_attention_only_by_rounding(impl, batch, shift, seed):
    """attend(rope(q, p + s), rope(k, p + s), v) == attend(rope(q, p), rope(k, p), v) up to float32 angles."""
    f = IMPLS[impl]()
    ar, inp = batch
    b, n = ar.shape
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((b, n, heads, 16)) for heads in (4, 2, 2))
    with f.context():
        mask = f.prefix_lm_mask(inp, ar)
        pos = f.positions_from_mask(inp, 0)
        out = [
            f.attend(f.rope(q, pos + o, 10000.0) / 4, f.rope(k, pos + o, 10000.0), v, mask, 50.0) for o in (0, shift)
        ]
    real = inp.astype(bool)
    np.testing.assert_allclose(out[1][real], out[0][real], atol=2e-5 * max(1, n + shift) * np.abs(v).max() / 10)


@each_impl
@settings(max_examples=40, deadline=None)
@given(d=st.sampled_from([8, 32]), c=st.floats(0.5, 1e3), seed=st.integers(0, 2**31 - 1))
def test_rms_norm_with_one_plus_scale_is_scale_invariant(impl, d, c, seed):
    f = IMPLS[impl]()
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, d)).astype(np.float32)
    scale = (rng.standard_normal(d) * 0.5).astype(np.float32)
    with f.context():
        y, yc = f.rms_norm(x, scale, 1e-6), f.rms_norm((x * c).astype(np.float32), scale, 1e-6)
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-6) * (1 + scale)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(yc, y, rtol=2e-5, atol=2e-6)  # eps / mean(x^2) <= ~1e-5 at c >= 0.5


@each_impl
@settings(max_examples=40, deadline=None)
@given(d=st.sampled_from([8, 32]), c=st.floats(0.5, 1e3), shift=st.floats(-10, 10), seed=st.integers(0, 2**31 - 1))
def test_layer_norm_is_scale_and_shift_invariant_with_zero_mean_output(impl, d, c, shift, seed):
    f = IMPLS[impl]()
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, d)).astype(np.float32)
    scale, bias = (rng.standard_normal(d) * 0.5 + 1).astype(np.float32), rng.standard_normal(d).astype(np.float32)
    one, zero = np.ones(d, np.float32), np.zeros(d, np.float32)
    with f.context():
        y = f.layer_norm(x, scale, bias, 1e-6)
        yc = f.layer_norm((x * c + shift).astype(np.float32), scale, bias, 1e-6)
        plain = f.layer_norm(x, one, zero, 1e-6)
    x64 = x.astype(np.float64)
    centred = x64 - x64.mean(-1, keepdims=True)
    want = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-6) * scale + bias
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    # float32 input x * c + shift rounds relative to |shift| / (c * std x), and eps breaks exact scale invariance by
    # a relative eps * |1 - 1/c^2| / (2 var): the tolerance follows both
    var = (centred**2).mean(-1).min()
    eps_term = 1e-6 * abs(1 - 1 / c**2) / (2 * var) * np.abs(want - bias).max()
    np.testing.assert_allclose(yc, y, atol=1e-5 + 2e-6 * abs(shift) / c * np.abs(scale).max() + 2 * eps_term)
    np.testing.assert_allclose(plain.mean(-1), 0, atol=1e-6)
    np.testing.assert_allclose((plain.astype(np.float64) ** 2).mean(-1), 1, rtol=1e-4)
