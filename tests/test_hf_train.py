"""The transformers side's training step (parity.hf_side.train_step) against independent computations: its loss
against a token-level mean computed by hand from transformers' float64 logits, its canonical gradients against
central finite differences in float64 through the converter's own HF transforms (spec.to_hf), its update against
w - lr * g, its big_vision step (`--convention big_vision`) against torch's, and its refusals."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from parity import hf_side, spec  # noqa: E402
from parity.config import TINY_VARIANTS  # noqa: E402
from parity.conventions import PRESETS  # noqa: E402
from parity.errors import ConfigError, InputsError  # noqa: E402
from parity.hf_side import hf_batch  # noqa: E402
from parity.processor import Tokenizer, build_inputs  # noqa: E402
from parity.training import TrainOptions  # noqa: E402

CFG = TINY_VARIANTS["tiny-pg2-gqa"]
LEAVES = (
    "llm/layers/attn/q_einsum/w",  # [L, N, D, H] <- per-layer [N*H, D] transposed
    "llm/layers/attn/kv_einsum/w",  # two HF tensors (k_proj, v_proj) per layer
    "llm/embedder/input_embedding",  # tied: lookup + head; HF padding rows dropped
    "img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel",
    "img/embedding/kernel",  # the patch conv
)


@pytest.fixture(scope="module")
def setup():
    params = spec.random_params(CFG, seed=1)
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (20, 20, 3), dtype=np.uint8) for _ in range(3)]
    x = build_inputs(
        imgs,
        ["caption en", "answer en how many?", "q"],
        ["a cat on a mat", "12", "the quick brown fox"],  # rows with different numbers of loss tokens
        tokenizer=Tokenizer("golden/tokenizer.model"),
        config=CFG,
    )
    m64 = hf_side.hf_module(CFG, params).double().eval()
    for mod in m64.modules():  # Gemma's RMSNorm computes in float32 whatever the dtype: make it float64 here
        if type(mod).__name__.endswith("RMSNorm"):
            mod.forward = rms_norm_64.__get__(mod)
    return params, x, m64


@contextlib.contextmanager
def softmax_64():
    """transformers' eager attention takes its softmax in float32 whatever the dtype: float64 inputs stay float64."""
    plain = torch.nn.functional.softmax

    def softmax(x, dim=None, _stacklevel=3, dtype=None):
        return plain(x, dim=dim, dtype=torch.float64 if x.dtype == torch.float64 else dtype)

    torch.nn.functional.softmax = softmax
    try:
        yield
    finally:
        torch.nn.functional.softmax = plain


def rms_norm_64(self, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


def by_hand(m64, params, x, pad_from=None):
    """float64 loss from transformers' logits: mean over every token of the batch with mask_loss[:, 1:] (the
    targets text[:, 1:] predicted at the position before), over the stored (padded) vocabulary; row means too.
    `pad_from`: the parameters whose HF vocabulary padding rows are kept (they are parameters of their own in
    transformers, not a function of the real rows)."""
    state = spec.to_hf(CFG, params)
    if pad_from is not None:
        for k, v in spec.to_hf(CFG, pad_from).items():
            if v.shape[0] == CFG.hf_vocab_rows and v.shape[0] > CFG.text.vocab_size:
                state[k][CFG.text.vocab_size :] = v[CFG.text.vocab_size :]
    m64.load_state_dict({hf_side_name(k): torch.as_tensor(v) for k, v in state.items()}, strict=False)
    m64.tie_weights()
    with torch.no_grad(), softmax_64():
        logits = m64(**hf_batch(CFG, x)).logits.numpy()[:, CFG.num_image_tokens :]
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1)[..., None]
    )
    w = x["mask_loss"][:, 1:]
    nll = -np.take_along_axis(logp[:, :-1], x["text"][:, 1:, None], -1)[..., 0] * w
    return nll.sum() / w.sum(), nll.sum(1) / w.sum(1)


def hf_side_name(key):
    from parity.hf_train import hf_name

    return hf_name(key)


def run(params, x, **kw):
    m = hf_side.build_model(CFG, PRESETS["transformers"], params=params)
    return hf_side.train_step(m, x, TrainOptions(**kw)), m


def test_loss_is_transformers_token_mean(setup):
    params, x, m64 = setup
    r, _ = run(params, x)
    loss, rows = by_hand(m64, params, x)
    assert abs(r.steps[0].loss - loss) <= 1e-5 * loss
    np.testing.assert_allclose(r.steps[0].example_loss, rows, rtol=1e-5)
    assert abs(np.mean(rows) - loss) > 1e-3  # the rows differ in length: per_token is not per_example here
    assert r.empty_rows == []


def test_gradients_match_finite_differences(setup):
    params, x, m64 = setup
    r, _ = run(params, x, trainable=LEAVES)
    assert sorted(r.grads) == sorted(LEAVES)
    rng = np.random.default_rng(3)
    eps = 1e-3  # float64 apart from transformers' float32 RoPE tables: central differences settle here
    for leaf in LEAVES:
        g = r.grads[leaf]
        assert g.dtype == np.float32 and g.shape == spec.canonical_shapes(CFG)[leaf]
        scale = float(np.abs(g).max())
        big = np.argwhere(np.abs(g) > 0.2 * scale)  # entries that matter, plus random ones
        picks = [tuple(big[rng.integers(len(big))]) for _ in range(2)]
        picks += [tuple(int(rng.integers(n)) for n in g.shape)]
        for idx in picks:
            p64 = {k: v.astype(np.float64) for k, v in params.items()}
            fd = []
            for sign in (1, -1):
                p64[leaf][idx] = params[leaf][idx] + sign * eps
                fd.append(by_hand(m64, p64, x, pad_from=params)[0])
            want = (fd[0] - fd[1]) / (2 * eps)
            assert abs(g[idx] - want) <= 3e-5 * scale + 1e-7, (leaf, idx, g[idx], want, scale)


def test_sgd_update_and_frozen_leaves(setup):
    params, x, _ = setup
    lr = 0.5
    r, m = run(params, x, lr=lr, steps=1)
    for leaf, g in r.grads.items():
        np.testing.assert_allclose(r.params[leaf], params[leaf] - np.float32(lr) * g, rtol=0, atol=1e-6)
        assert not np.array_equal(r.params[leaf], params[leaf])
    now = spec.from_hf(CFG, {k: v.detach().numpy() for k, v in named_state(m).items()})
    for leaf in set(params) - set(r.grads):
        np.testing.assert_array_equal(now[leaf], params[leaf])  # frozen: bit-identical
    assert all(p.grad is None and not p.requires_grad for p in m.module.parameters())
    r2, _ = run(params, x, lr=0.0, steps=2)
    for leaf in r2.params:
        np.testing.assert_array_equal(r2.params[leaf], params[leaf])  # lr 0: bit-identical
    assert r2.steps[0].loss == r2.steps[1].loss


def named_state(m):
    """The module's tensors under the spec's on-disk HF names."""
    out = {}
    for k in spec.hf_shapes(CFG):
        out[k] = m.module.get_parameter(hf_side_name(k))
    return out


def test_causal_prefix_warns_and_changes_the_loss(setup, capsys):
    params, x, _ = setup
    m = hf_side.build_model(CFG, PRESETS["transformers"], params=params)
    causal = hf_side.train_step(m, x, TrainOptions(lr=0.0), causal_prefix=True)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fully causal" in err
    r, _ = run(params, x, lr=0.0)
    assert abs(causal.steps[0].loss - r.steps[0].loss) > 1e-4


def test_refusals(setup):
    params, x, _ = setup
    m = hf_side.build_model(CFG, PRESETS["transformers"], params=params)
    with pytest.raises(ConfigError, match="--frozen-dtype float16"):
        hf_side.train_step(m, x, TrainOptions(frozen_dtype="float16"))
    with pytest.raises(InputsError, match="parity inputs --suffix"):
        hf_side.train_step(m, {k: v for k, v in x.items() if k != "mask_loss"}, TrainOptions())
    with pytest.raises(ConfigError, match="sliding_window='keras_hub'"):  # keras-hub's band: not transformers'
        hf_side.build_model(CFG, PRESETS["keras_hub"], params=params)
    bv = hf_side.build_model(CFG, PRESETS["big_vision"], params=params)  # trains only: no forward, no decoding
    with pytest.raises(ConfigError, match="forward passes and decoding under the 'transformers' convention"):
        hf_side.forward(bv, x)


def test_big_vision_step_matches_torch(setup):
    """`--impl transformers --convention big_vision`: transformers' modules run big_vision's step (shifted inputs,
    its mask, positions from 0, no final softcap, per-example loss over the real vocabulary rows); torch's step
    (independent code) gives the same losses, first-step gradients of five differently mapped leaves and, after
    two SGD steps, the same leaves."""
    from parity.torch_impl import api as torch_api

    params, x, _ = setup
    opts = TrainOptions(trainable=LEAVES, steps=2, lr=0.1)
    bv = PRESETS["big_vision"]
    r = hf_side.train_step(hf_side.build_model(CFG, bv, params=params), x, opts)
    t = torch_api.train_step(torch_api.build_model(CFG, bv, params=params), x, opts)
    for got, want in zip(r.steps, t.steps, strict=True):
        assert abs(got.loss - want.loss) <= 1e-6 * want.loss
        np.testing.assert_allclose(got.example_loss, want.example_loss, rtol=1e-6)
        assert abs(got.loss - np.mean(got.example_loss)) <= 1e-6 * got.loss  # per_example
    for leaf in LEAVES:
        scale = float(np.abs(t.grads[leaf]).max())
        assert float(np.abs(r.grads[leaf] - t.grads[leaf]).max()) <= 3e-5 * scale, leaf
        np.testing.assert_allclose(r.params[leaf], t.params[leaf], rtol=0, atol=1e-5)
    hf, _ = run(params, x, trainable=LEAVES)  # transformers' own convention: another loss on the same batch
    assert abs(hf.steps[0].loss - r.steps[0].loss) > 1e-3
