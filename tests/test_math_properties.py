"""Hypothesis property tests of the mask, sliding-window, RoPE and softcap math, each against a formula written
out independently here (loops over the definitions, float64 numpy, complex rotations)."""
import numpy as np
import torch
from hypothesis import given, settings, strategies as st

from parity.torch_impl.attention import (positions_from_mask, prefix_lm_mask, rope, same_block, sliding_window_mask,
                                         softcap)


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
    return torch.tensor(ar), torch.tensor(inp)


@settings(max_examples=80, deadline=None)
@given(rows())
def test_prefix_lm_mask_is_the_definition(batch):
    ar, inp = batch
    got = prefix_lm_mask(inp, ar).numpy()
    b, n = ar.shape
    for r in range(b):
        prefix = int((ar[r] == 0).sum())
        for i in range(n):
            for j in range(n):
                real = inp[r, i] and inp[r, j]
                # prefix tokens see the whole prefix; suffix token i also sees suffix tokens j <= i
                want = real and (j < prefix or (i >= prefix and j <= i))
                assert got[r, i, j] == want, (r, i, j)


@settings(max_examples=60, deadline=None)
@given(rows(max_len=14), st.integers(1, 6))
def test_sliding_window_is_the_transformers_rule(batch, window):
    ar, inp = batch
    mask = prefix_lm_mask(inp, ar)
    pos = positions_from_mask(inp, 0)
    got = sliding_window_mask(mask, pos, pos, window, same_block(ar) & mask).numpy()
    b, n = ar.shape
    for r in range(b):
        prefix = int((ar[r] == 0).sum())
        for i in range(n):
            for j in range(n):
                in_prefix_block = i < prefix and j < prefix
                want = bool(mask[r, i, j]) and (in_prefix_block or i - j < window)
                assert got[r, i, j] == want, (r, i, j, window)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 3000), st.integers(0, 3000), st.sampled_from([4, 8, 16, 64]), st.integers(0, 2**31 - 1))
def test_rope_is_a_complex_rotation_and_relative(p, s, h, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(h)
    k = rng.standard_normal(h)
    theta = 10000.0 ** (-np.arange(h // 2) * 2 / h)

    def rot64(x, pos):  # half-split pairs (x_i, x_{i+H/2}) as complex numbers times e^{i pos theta}
        z = (x[: h // 2] + 1j * x[h // 2:]) * np.exp(1j * pos * theta)
        return np.concatenate([z.real, z.imag])

    def ours(x, pos):
        t = torch.tensor(x, dtype=torch.float64).view(1, 1, 1, h)
        return rope(t, torch.tensor([[pos]]), 10000.0).view(h).numpy()

    # Angles are float32 by design (transformers' formula), so they carry ~6e-8 relative error: tolerances scale
    # with the position; the float64 rotation itself is exact.
    np.testing.assert_allclose(ours(q, p), rot64(q, p), atol=2e-7 * max(1, p) * np.abs(q).max())
    np.testing.assert_allclose(np.linalg.norm(ours(q, p)), np.linalg.norm(q), rtol=1e-6)  # float32 cos/sin
    # attention logits depend only on p - s
    np.testing.assert_allclose(ours(q, p) @ ours(k, s), rot64(q, p - s) @ k,
                               atol=4e-7 * max(1, p, s) * np.linalg.norm(q) * np.linalg.norm(k))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-1e4, 1e4, allow_nan=False), min_size=1, max_size=50), st.sampled_from([30.0, 50.0]))
def test_softcap_bounds_monotone_and_identity_near_zero(xs, cap):
    x = torch.tensor(sorted(xs), dtype=torch.float64)
    y = softcap(x, cap)
    np.testing.assert_allclose(y.numpy(), cap * np.tanh(np.array(sorted(xs)) / cap), rtol=1e-12, atol=1e-12)
    assert (y.abs() <= cap).all()
    assert (y[1:] >= y[:-1]).all()
    small = x[x.abs() < 1e-3]
    np.testing.assert_allclose(softcap(small, cap).numpy(), small.numpy(), rtol=1e-6, atol=1e-300)
