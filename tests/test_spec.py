"""The spec against published facts (parameter counts, released key sets) and its own invertibility."""

import dataclasses

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parity import spec
from parity.config import (
    RESOLUTIONS,
    TINY_VARIANTS,
    VARIANTS,
    PaliGemmaConfig,
    QueryScale,
    TextConfig,
    VisionConfig,
    get_config,
)

PUBLISHED = {  # keras-hub presets / layouts.md §1.3
    "paligemma-3b": (2_923_335_408, 2_924_220_144, 2_927_759_088),
    "paligemma2-3b": (3_032_094_960, 3_032_979_696, 3_036_518_640),
    "paligemma2-10b": (9_662_409_456, 9_663_294_192, 9_666_833_136),
    "paligemma2-28b": (27_650_192_112, 27_651_076_848, 27_654_615_792),
}


@pytest.mark.parametrize("llm", PUBLISHED)
def test_parameter_counts_equal_published(llm):
    for res, n in zip(RESOLUTIONS, PUBLISHED[llm]):
        assert spec.param_count(get_config(f"{llm}-{res}")) == n


def _released_keys(gemma2: bool, L, D, F, N, K, H):
    blk = "img/Transformer/encoderblock"
    mha = f"{blk}/MultiHeadDotProductAttention_0"
    keys = {
        "img/embedding/kernel": (14, 14, 3, 1152),
        "img/embedding/bias": (1152,),
        "img/pos_embedding": (1, 256, 1152),
        f"{blk}/LayerNorm_0/scale": (27, 1152),
        f"{blk}/LayerNorm_0/bias": (27, 1152),
        f"{blk}/LayerNorm_1/scale": (27, 1152),
        f"{blk}/LayerNorm_1/bias": (27, 1152),
        f"{mha}/out/kernel": (27, 16, 72, 1152),
        f"{mha}/out/bias": (27, 1152),
        f"{blk}/MlpBlock_0/Dense_0/kernel": (27, 1152, 4304),
        f"{blk}/MlpBlock_0/Dense_0/bias": (27, 4304),
        f"{blk}/MlpBlock_0/Dense_1/kernel": (27, 4304, 1152),
        f"{blk}/MlpBlock_0/Dense_1/bias": (27, 1152),
        "img/Transformer/encoder_norm/scale": (1152,),
        "img/Transformer/encoder_norm/bias": (1152,),
        "img/head/kernel": (1152, D),
        "img/head/bias": (D,),
        "llm/embedder/input_embedding": (257152, D),
        "llm/layers/pre_attention_norm/scale": (L, D),
        "llm/layers/pre_ffw_norm/scale": (L, D),
        "llm/layers/attn/q_einsum/w": (L, N, D, H),
        "llm/layers/attn/kv_einsum/w": (L, 2, K, D, H),
        "llm/layers/attn/attn_vec_einsum/w": (L, N, H, D),
        "llm/layers/mlp/gating_einsum": (L, 2, D, F),
        "llm/layers/mlp/linear": (L, F, D),
        "llm/final_norm/scale": (D,),
    }
    for p in ("query", "key", "value"):
        keys[f"{mha}/{p}/kernel"] = (27, 1152, 16, 72)
        keys[f"{mha}/{p}/bias"] = (27, 16, 72)
    if gemma2:
        keys["llm/layers/post_attention_norm/scale"] = (L, D)
        keys["llm/layers/post_ffw_norm/scale"] = (L, D)
    return keys


def test_released_pg1_3b_224_key_set():
    shapes = spec.canonical_shapes(get_config("paligemma-3b-224"))
    assert len(shapes) == 32
    assert shapes == _released_keys(False, 18, 2048, 16384, 8, 1, 256)
    assert shapes["llm/layers/attn/kv_einsum/w"] == (18, 2, 1, 2048, 256)


def test_released_pg2_3b_224_key_set():
    shapes = spec.canonical_shapes(get_config("paligemma2-3b-224"))
    assert len(shapes) == 34
    assert shapes == _released_keys(True, 26, 2304, 9216, 8, 4, 256)
    assert shapes["llm/layers/attn/kv_einsum/w"] == (26, 2, 4, 2304, 256)


def test_hf_tensor_counts_and_padding():
    # layouts.md §3.1: PG1 603, PG2-3B 727, PG2-10B 903, PG2-28B 947 on-disk tensors; 257216 embedding rows.
    counts = {"paligemma-3b-224": 603, "paligemma2-3b-224": 727, "paligemma2-10b-224": 903, "paligemma2-28b-224": 947}
    for name, n in counts.items():
        hf = spec.hf_shapes(get_config(name))
        assert len(hf) == n
        assert hf["language_model.model.embed_tokens.weight"][0] == 257216
        assert "lm_head.weight" not in hf
    pg1 = spec.hf_shapes(get_config("paligemma-3b-224"))
    assert pg1["language_model.model.layers.0.post_attention_layernorm.weight"] == (2048,)
    assert "language_model.model.layers.0.pre_feedforward_layernorm.weight" not in pg1
    pg2 = spec.hf_shapes(get_config("paligemma2-3b-224"))
    assert pg2["language_model.model.layers.3.self_attn.q_proj.weight"] == (2048, 2304)
    assert pg2["language_model.model.layers.3.self_attn.k_proj.weight"] == (1024, 2304)
    assert pg2["language_model.model.layers.3.self_attn.o_proj.weight"] == (2304, 2048)
    assert pg2["vision_tower.vision_model.embeddings.patch_embedding.weight"] == (1152, 3, 14, 14)


def test_norm_name_collision_follows_family():
    """HF Gemma 1 `post_attention_layernorm` is big_vision's pre_ffw_norm; in Gemma 2 it is post_attention_norm."""

    def hf_of(cfg, key):
        return next(e for e in spec.entries(cfg) if e.key == key).hf_templates[0]

    assert hf_of(get_config("paligemma-3b-224"), "llm/layers/pre_ffw_norm/scale").endswith(
        "post_attention_layernorm.weight"
    )
    assert hf_of(get_config("paligemma2-3b-224"), "llm/layers/post_attention_norm/scale").endswith(
        "post_attention_layernorm.weight"
    )
    assert hf_of(get_config("paligemma2-3b-224"), "llm/layers/pre_ffw_norm/scale").endswith(
        "pre_feedforward_layernorm.weight"
    )


def test_fused_qkv_when_k_equals_n():
    keys = spec.canonical_shapes(TINY_VARIANTS["tiny-pg1-kn"])
    assert keys["llm/layers/attn/qkv_einsum/w"] == (2, 3, 2, 48, 16)
    assert "llm/layers/attn/q_einsum/w" not in keys


def test_q_proj_matches_einsum_by_hand():
    """The HF q_proj row order is head-major (n*H + h): x @ q_proj.T equals einsum('D,NDH->NH')."""
    cfg = TINY_VARIANTS["tiny-pg2-gqa"]
    p = spec.random_params(cfg, seed=3)
    hf = spec.to_hf(cfg, p)
    x = np.random.default_rng(0).standard_normal(cfg.text.width).astype(np.float32)
    w = p["llm/layers/attn/q_einsum/w"][1]
    want = np.einsum("D,NDH->NH", x, w).reshape(-1)
    got = hf["language_model.model.layers.1.self_attn.q_proj.weight"] @ x
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # o_proj: out = o_proj @ concat_heads(h) equals einsum('NH,NHD->D').
    wo = p["llm/layers/attn/attn_vec_einsum/w"][2]
    h = np.random.default_rng(1).standard_normal((cfg.text.num_heads, cfg.text.head_dim)).astype(np.float32)
    np.testing.assert_allclose(
        hf["language_model.model.layers.2.self_attn.o_proj.weight"] @ h.reshape(-1),
        np.einsum("NH,NHD->D", h, wo),
        rtol=1e-5,
        atol=1e-5,
    )
    # patch conv: HWIO -> OIHW
    k = p["img/embedding/kernel"]
    np.testing.assert_array_equal(
        hf["vision_tower.vision_model.embeddings.patch_embedding.weight"][5, 2, 1, 3], k[1, 3, 2, 5]
    )


# -- hypothesis: inverse(forward(x)) == x bit-exact for every entry, over shape families and dtypes --------------
@st.composite
def configs(draw):
    K = draw(st.integers(1, 3))
    G = draw(st.integers(1, 3))
    H = draw(st.sampled_from([2, 4, 6]))
    Nv = draw(st.integers(1, 3))
    text = TextConfig(
        width=draw(st.integers(2, 12)),
        depth=draw(st.integers(1, 3)),
        mlp_dim=draw(st.integers(1, 9)),
        num_heads=K * G,
        num_kv_heads=K,
        head_dim=H,
        vocab_size=draw(st.integers(3, 70)),
        gemma2=draw(st.booleans()),
        query_scale=draw(st.sampled_from(list(QueryScale))),
    )
    patch = draw(st.integers(1, 3))
    vision = VisionConfig(
        width=Nv * draw(st.integers(1, 4)),
        depth=draw(st.integers(1, 3)),
        mlp_dim=draw(st.integers(1, 7)),
        num_heads=Nv,
        patch_size=patch,
        image_size=patch * draw(st.integers(1, 3)),
    )
    return PaliGemmaConfig("hypothesis", vision, text)


DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@settings(max_examples=60, deadline=None)
@given(cfg=configs(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_spec_roundtrip_is_bit_exact(cfg, dtype, seed):
    rng = np.random.default_rng(seed)
    params = {
        e.key: rng.integers(0, 2**16, e.shape, dtype=np.uint16).view(np.float16).astype(np.float32).astype(dtype)
        if dtype != np.float32
        else rng.standard_normal(e.shape).astype(np.float32)
        for e in spec.entries(cfg)
    }
    hf = spec.to_hf(cfg, params)
    assert {k: v.shape for k, v in hf.items()} == spec.hf_shapes(cfg)
    back = spec.from_hf(cfg, hf)
    assert set(back) == set(params)
    for k in params:
        assert back[k].dtype == params[k].dtype
        # compare bit patterns, so NaN payloads and -0.0 count too
        assert back[k].tobytes() == params[k].tobytes(), k


@settings(max_examples=40, deadline=None)
@given(cfg=configs())
def test_every_entry_and_op_inverts(cfg):
    rng = np.random.default_rng(0)
    for e in spec.entries(cfg):
        piece = rng.standard_normal(e.piece_shape).astype(np.float32)
        pad = rng.standard_normal(e.piece_shape[1:]).astype(np.float32) if e.lossy else None
        y = e.to_hf(piece, pad)
        assert y.shape == e.hf_shape
        assert np.array_equal(e.from_hf(y), piece)
        if e.lossy:  # padded rows are exactly the given row
            assert np.array_equal(y[e.piece_shape[0] :], np.broadcast_to(pad, y[e.piece_shape[0] :].shape))


def test_config_json_roundtrip_every_variant():
    for cfg in list(VARIANTS.values()) + list(TINY_VARIANTS.values()):
        again = type(cfg).from_dict(cfg.to_dict())
        assert again == cfg
        assert dataclasses.replace(again) == cfg
