"""Proof against outside code: tiny random transformers PaliGemma models, saved, converted to npz and back."""

import os

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file as st_load  # noqa: E402

from converters.checkpoint import normalize_hf_key, open_checkpoint  # noqa: E402
from converters.convert import convert  # noqa: E402

V, VHF = 512, 576  # real vocabulary; HF rows (V + 2 rounded up to 64)

VISION = dict(
    model_type="siglip_vision_model",
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    patch_size=7,
    image_size=28,
    vision_use_head=False,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
)
TEXT = {
    "gemma_mqa": dict(
        model_type="gemma",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=VHF,
        hidden_activation="gelu_pytorch_tanh",
    ),
    "gemma2_gqa_28b_scale": dict(
        model_type="gemma2",
        hidden_size=72,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=VHF,
        query_pre_attn_scalar=18,
        sliding_window=6,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        hidden_activation="gelu_pytorch_tanh",
    ),
}


def make_hf_model(text, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.PaliGemmaConfig(
        vision_config=VISION,
        text_config=text,
        image_token_index=V,
        projection_dim=text["hidden_size"],
        hidden_size=text["hidden_size"],
    )
    model = transformers.PaliGemmaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # HF initialises norms to 0 and some weights to 0: randomise everything
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.to(dtype)


def logits_of(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    pix = torch.rand(2, 3, 28, 28, generator=g) * 2 - 1
    txt = torch.randint(3, V, (2, 7), generator=g)
    txt[:, 0] = 2
    ids = torch.cat([torch.full((2, 16), V), txt], dim=1)
    tt = torch.cat([torch.zeros(2, 20, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)], dim=1)
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pix.to(model.dtype), token_type_ids=tt).logits


@pytest.mark.parametrize("name", list(TEXT))
def test_save_pretrained_to_npz_and_back(tmp_path, name):
    model = make_hf_model(TEXT[name])
    model.save_pretrained(tmp_path / "hf")
    # transformers 5.24 writes `vision_tower.embeddings...` (no `vision_model.` level); the hub has it.
    original = {normalize_hf_key(k): v for k, v in st_load(str(tmp_path / "hf" / "model.safetensors")).items()}

    r = convert(tmp_path / "hf", tmp_path / "m.npz", "npz")
    assert r["config_source"] == "config.json"
    assert any("lossy: dropped the 64" in n for n in r["notes"])
    convert(tmp_path / "m.npz", tmp_path / "back", "safetensors")
    back = st_load(str(tmp_path / "back" / "model.safetensors"))

    assert set(back) == set(original) - {"lm_head.weight", "language_model.lm_head.weight"}
    emb = "language_model.model.embed_tokens.weight"
    for k in back:
        a, b = original[k], back[k]
        if k == emb:  # every tensor bit-exact except the documented padding rows
            a, b = a[:V], b[:V]
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), k

    reloaded, info = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
        tmp_path / "back", output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    reloaded.eval()
    model.config._attn_implementation = "eager"
    la, lb = logits_of(model)[..., :V], logits_of(reloaded)[..., :V]
    assert torch.equal(la, lb)  # exactly equal, not merely close


def test_bf16_roundtrip_through_v2_npz(tmp_path):
    model = make_hf_model(TEXT["gemma2_gqa_28b_scale"], dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "hf")
    original = {normalize_hf_key(k): v for k, v in st_load(str(tmp_path / "hf" / "model.safetensors")).items()}
    convert(tmp_path / "hf", tmp_path / "m.b16.npz", "npz")
    with np.load(tmp_path / "m.b16.npz", allow_pickle=False) as z:  # stored as numpy void, like the releases
        assert {z[k].dtype.str for k in z.files} == {"|V2"}
    with open_checkpoint(tmp_path / "m.b16.npz") as ck:
        assert {ck.dtype(e) for e in ck.entries()} == {np.dtype(ml_dtypes.bfloat16)}
    convert(tmp_path / "m.b16.npz", tmp_path / "back", "safetensors")
    back = st_load(str(tmp_path / "back" / "model.safetensors"))
    for k, b in back.items():
        a = original[k][:V] if k.endswith("embed_tokens.weight") else original[k]
        b = b[:V] if k.endswith("embed_tokens.weight") else b
        assert a.dtype == b.dtype == ml_dtypes.bfloat16 and a.tobytes() == b.tobytes(), k


def test_our_config_json_builds_the_same_model(tmp_path):
    """from_pretrained of a directory we wrote from an npz alone (config from shapes) has no missing keys."""
    from parity import spec
    from parity.config import TINY_VARIANTS

    for cfg in TINY_VARIANTS.values():
        params = spec.random_params(cfg, seed=11)
        np.savez(tmp_path / f"{cfg.name}.npz", **{"params/" + k: v for k, v in params.items()})
        convert(tmp_path / f"{cfg.name}.npz", tmp_path / cfg.name, "safetensors")
        m, info = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
            tmp_path / cfg.name, output_loading_info=True
        )
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], cfg.name
        tc = m.config.text_config
        assert tc.num_key_value_heads == cfg.text.num_kv_heads and tc.head_dim == cfg.text.head_dim
        if cfg.text.gemma2:
            assert tc.query_pre_attn_scalar**-0.5 == pytest.approx(cfg.text.query_scale_value)
            assert tc.sliding_window == cfg.text.sliding_window
        assert os.path.exists(tmp_path / cfg.name / "config.json")
