"""keras-hub's PaliGemma (keras-hub 0.32, JAX backend) as a test oracle.

A `PaliGemmaBackbone` is built offline from one of our configs (keras-hub names every hyper-parameter differently,
`keras_config`), its variables are assigned from canonical parameters through `KERAS_NAMES` (parity.spec's keys
-> keras-hub's variable paths; the layer and split structure of each key is parity.spec's), and the points
keras-hub lets one read come from keras-hub's own layers and graph: the ViT sub-layers called in the order its
encoder calls them, a functional model over the backbone's graph for the decoder blocks, `PaliGemmaCausalLM` for
the logits and `generate` for greedy tokens.

Imported only by tests/test_keras_hub.py, after it has set KERAS_BACKEND=jax and skipped when keras-hub is absent.
"""

from __future__ import annotations

import jax
import keras
import keras_hub
import numpy as np

from parity import points, spec
from parity.config import PaliGemmaConfig, QueryScale

BV_BLK = "img/Transformer/encoderblock"
BV_MHA = f"{BV_BLK}/MultiHeadDotProductAttention_0"
ENC = "image_encoder/encoder_block_{i}"
MHA = f"{ENC}/multi_head_attention"
DEC = "decoder_block_{i}"

# canonical key -> keras-hub variable path(s): one per piece of the key's split axis (kv -> key, value; qkv ->
# query, key, value; gating -> gate, up), `{i}` the layer of a stacked key. Every transform is a reshape that merges
# adjacent axes ([Dv, Nv, Hv] -> [Dv, Nv*Hv], [1, T, Dv] -> [T, Dv]); `keras_weights` checks that and nothing else.
KERAS_NAMES: dict[str, tuple[str, ...]] = {
    "img/embedding/kernel": ("image_encoder/encoder_embeddings/embedding_conv/kernel",),  # HWIO, as big_vision
    "img/embedding/bias": ("image_encoder/encoder_embeddings/embedding_conv/bias",),
    "img/pos_embedding": ("image_encoder/encoder_embeddings/position_embedding/embeddings",),
    f"{BV_BLK}/LayerNorm_0/scale": (f"{ENC}/layer_norm_1/gamma",),
    f"{BV_BLK}/LayerNorm_0/bias": (f"{ENC}/layer_norm_1/beta",),
    f"{BV_MHA}/query/kernel": (f"{MHA}/query_proj/kernel",),
    f"{BV_MHA}/query/bias": (f"{MHA}/query_proj/bias",),
    f"{BV_MHA}/key/kernel": (f"{MHA}/key_proj/kernel",),
    f"{BV_MHA}/key/bias": (f"{MHA}/key_proj/bias",),
    f"{BV_MHA}/value/kernel": (f"{MHA}/value_proj/kernel",),
    f"{BV_MHA}/value/bias": (f"{MHA}/value_proj/bias",),
    f"{BV_MHA}/out/kernel": (f"{MHA}/out_proj/kernel",),
    f"{BV_MHA}/out/bias": (f"{MHA}/out_proj/bias",),
    f"{BV_BLK}/LayerNorm_1/scale": (f"{ENC}/layer_norm_2/gamma",),
    f"{BV_BLK}/LayerNorm_1/bias": (f"{ENC}/layer_norm_2/beta",),
    f"{BV_BLK}/MlpBlock_0/Dense_0/kernel": (f"{ENC}/mlp_dense_1/kernel",),
    f"{BV_BLK}/MlpBlock_0/Dense_0/bias": (f"{ENC}/mlp_dense_1/bias",),
    f"{BV_BLK}/MlpBlock_0/Dense_1/kernel": (f"{ENC}/mlp_dense_2/kernel",),
    f"{BV_BLK}/MlpBlock_0/Dense_1/bias": (f"{ENC}/mlp_dense_2/bias",),
    "img/Transformer/encoder_norm/scale": ("image_encoder/encoder_layer_norm/gamma",),
    "img/Transformer/encoder_norm/bias": ("image_encoder/encoder_layer_norm/beta",),
    "img/head/kernel": ("image_classifier/kernel",),
    "img/head/bias": ("image_classifier/bias",),
    "llm/embedder/input_embedding": ("token_embedding/embeddings",),  # tied: also the output projection
    "llm/layers/pre_attention_norm/scale": (f"{DEC}/pre_attention_norm/scale",),
    "llm/layers/attn/q_einsum/w": (f"{DEC}/attention/query/kernel",),
    "llm/layers/attn/kv_einsum/w": (f"{DEC}/attention/key/kernel", f"{DEC}/attention/value/kernel"),
    "llm/layers/attn/qkv_einsum/w": (
        f"{DEC}/attention/query/kernel",
        f"{DEC}/attention/key/kernel",
        f"{DEC}/attention/value/kernel",
    ),
    "llm/layers/attn/attn_vec_einsum/w": (f"{DEC}/attention/attention_output/kernel",),
    "llm/layers/pre_ffw_norm/scale": (f"{DEC}/pre_ffw_norm/scale",),
    "llm/layers/post_attention_norm/scale": (f"{DEC}/post_attention_norm/scale",),
    "llm/layers/post_ffw_norm/scale": (f"{DEC}/post_ffw_norm/scale",),
    "llm/layers/mlp/gating_einsum": (f"{DEC}/ffw_gating/kernel", f"{DEC}/ffw_gating_2/kernel"),
    "llm/layers/mlp/linear": (f"{DEC}/ffw_linear/kernel",),
    "llm/final_norm/scale": ("final_normalization/scale",),
}


def keras_config(cfg: PaliGemmaConfig) -> dict:
    """PaliGemmaBackbone keyword arguments for `cfg` (keras' `intermediate_dim` is 2F: gate and up together)."""
    t, v = cfg.text, cfg.vision
    # keras-hub hard-codes these; a config that differs cannot be built there.
    assert t.rope_base == 10_000.0 and v.norm_eps == 1e-6, "keras-hub fixes RoPE base 1e4 and ViT LayerNorm eps 1e-6"
    return dict(
        vocabulary_size=t.vocab_size,
        image_size=v.image_size,
        num_layers=t.depth,
        num_query_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads,
        hidden_dim=t.width,
        intermediate_dim=2 * t.mlp_dim,
        head_dim=t.head_dim,
        vit_patch_size=v.patch_size,
        vit_num_heads=v.num_heads,
        vit_hidden_dim=v.width,
        vit_num_layers=v.depth,
        vit_intermediate_dim=v.mlp_dim,
        query_head_dim_normalize=t.query_scale is QueryScale.HEAD_DIM,
        use_post_ffw_norm=t.gemma2,
        use_post_attention_norm=t.gemma2,
        attention_logit_soft_cap=t.attn_softcap,
        final_logit_soft_cap=t.final_softcap,
        use_sliding_window_attention=t.sliding_window is not None,
        sliding_window_size=t.sliding_window or 4096,
        layer_norm_epsilon=t.norm_eps,
    )


def _merges_adjacent_axes(src: tuple[int, ...], dst: tuple[int, ...]) -> bool:
    """dst is src with runs of adjacent axes multiplied together (size-1 axes dropped or added)."""
    src, i = [s for s in src if s != 1], 0
    for d in (d for d in dst if d != 1):
        n = 1
        while n < d and i < len(src):
            n, i = n * src[i], i + 1
        if n != d:
            return False
    return i == len(src)


def keras_weights(cfg: PaliGemmaConfig, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{keras-hub variable path: array} from canonical params, every spec key used once."""
    out: dict[str, np.ndarray] = {}
    for e in spec.entries(cfg):
        names = KERAS_NAMES[e.key]
        assert len(names) == len(e.hf_templates), (e.key, names)
        for _, addr in e.hf_keys():
            layer, piece = addr
            path = names[piece or 0].format(i=layer)
            assert path not in out, path
            out[path] = np.asarray(params[e.key][e.index(addr)])
    return out


def keras_backbone(cfg: PaliGemmaConfig, params: dict[str, np.ndarray], dtype: str = "float32"):
    """A PaliGemmaBackbone of `cfg` holding `params`; every keras variable assigned exactly once."""
    bb = keras_hub.models.PaliGemmaBackbone(**keras_config(cfg), dtype=dtype)
    weights = keras_weights(cfg, params)
    variables = {v.path: v for v in bb.weights}
    assert set(variables) == set(weights), sorted(set(variables) ^ set(weights))
    for path, value in weights.items():
        var = variables[path]
        shape = tuple(var.shape)
        assert _merges_adjacent_axes(value.shape, shape), (path, value.shape, shape)
        var.assign(value.reshape(shape).astype(np.float32))
    return bb


def keras_batch(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our inputs as keras-hub's: response_mask marks the causal suffix (mask_ar on real tokens)."""
    mask_input = inputs.get("mask_input", np.ones_like(inputs["text"]))
    return {
        "images": inputs["image"].astype(np.float32),
        "token_ids": inputs["text"].astype(np.int32),
        "padding_mask": mask_input.astype(np.int32),
        "response_mask": (inputs["mask_ar"] * mask_input).astype(np.int32),
    }


def _graph(cfg: PaliGemmaConfig, bb):
    """A functional model over the backbone's own graph: llm/input_embeddings, llm/layerNN/out, llm/final_norm."""
    x_in = bb.transformer_layers[0].input[0]  # the block's inputs flattened: (x, padding_mask, response_mask)
    assert tuple(x_in.shape)[1:] == (None, cfg.text.width), x_in
    graph = {points.LLM_INPUT: x_in, points.LLM_FINAL_NORM: bb.output}
    graph.update({points.llm_block_out(i): layer.output for i, layer in enumerate(bb.transformer_layers)})
    return keras.Model(bb.input, graph)


def _run(fn, *args) -> dict[str, np.ndarray]:
    """fn jitted (keras ops on the JAX backend, as keras-hub's own generate runs them; one XLA compilation instead
    of one per eager op), outputs as float32 numpy."""
    return {k: np.asarray(v, dtype=np.float32) for k, v in jax.jit(fn)(*args).items()}


def keras_graph_points(cfg: PaliGemmaConfig, bb, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """llm/input_embeddings, llm/layerNN/out and llm/final_norm read from the backbone's graph."""
    return _run(_graph(cfg, bb), batch)


def keras_forward(cfg: PaliGemmaConfig, bb, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The points keras-hub exposes: img/with_posemb, img/blockNN/out, img/encoder_norm (the encoder's sub-layers,
    called as PaliGemmaVitEncoder.call calls them), img/projector (the ViT model), `keras_graph_points` and logits
    [B, L, V] at the text positions (PaliGemmaCausalLM)."""
    enc = bb.vit_encoder.get_layer("image_encoder")
    graph = _graph(cfg, bb)
    lm = keras_hub.models.PaliGemmaCausalLM(backbone=bb, preprocessor=None)

    def run(batch):
        out = {}
        x = enc.vision_embeddings(batch["images"])
        out[points.IMG_POS_EMBED] = x
        for i, block in enumerate(enc.resblocks):
            x = block(x)
            out[points.img_block_out(i)] = x
        out[points.IMG_FINAL_NORM] = enc.encoder_layer_norm(x)
        out[points.PROJECTOR] = bb.vit_encoder(batch["images"])
        out[points.LOGITS] = lm(batch)
        return {**out, **graph(batch)}

    return _run(run, keras_batch(inputs))


def keras_logits_all_positions(cfg: PaliGemmaConfig, bb, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """float32[B, T + L, V]: PaliGemmaCausalLM's own computation before it keeps the text positions
    (`backbone.token_embedding(hidden_state, reverse=True)`, the final softcap inside it; then
    `[:, image_sequence_length:]`), on the backbone's graph output: our logits point covers every position."""
    graph = _graph(cfg, bb)
    return _run(
        lambda batch: {points.LOGITS: bb.token_embedding(graph(batch)[points.LLM_FINAL_NORM], reverse=True)},
        keras_batch(inputs),
    )[points.LOGITS]


def _row(inputs: dict[str, np.ndarray], r: int, size: int) -> tuple[int, dict[str, np.ndarray]]:
    """Row r of `inputs` as keras-hub's generation input of `size` text slots: its real tokens, then empty slots."""
    n = int(inputs.get("mask_input", np.ones_like(inputs["text"]))[r].sum())
    tokens = np.zeros((1, size), np.int32)
    tokens[0, :n] = inputs["text"][r, :n]
    padding = np.zeros_like(tokens)
    padding[0, :n] = 1
    return n, {"images": inputs["image"][r : r + 1].astype(np.float32), "token_ids": tokens, "padding_mask": padding}


def keras_generate(bb, inputs: dict[str, np.ndarray], max_new: int) -> np.ndarray:
    """Greedy tokens int32[B, max_new] from PaliGemmaCausalLM.generate (no stop token: exactly max_new per row).

    keras-hub's prefill attends over the whole prompt (no response mask: the prompt is all prefix) and its first
    decode step recomputes the shortest row's last prompt token causally for every row, so the rows of one call must
    have equal lengths: each row is generated in its own call, with its real tokens only (all calls of one shape, L +
    max_new slots: one compilation; a shorter row generates further, its first max_new tokens are kept)."""
    lm = keras_hub.models.PaliGemmaCausalLM(backbone=bb, preprocessor=None)
    lm.compile(sampler="greedy")
    rows = []
    for r in range(inputs["text"].shape[0]):
        n, batch = _row(inputs, r, inputs["text"].shape[1] + max_new)
        rows.append(np.asarray(lm.generate(batch, stop_token_ids=None)["token_ids"])[0, n : n + max_new])
    return np.stack(rows).astype(np.int32)


def keras_decode(cfg: PaliGemmaConfig, bb, inputs: dict[str, np.ndarray], tokens: np.ndarray):
    """Each row decoded by keras-hub's own generation steps, fed its `tokens` [B, N] (teacher-forced):
    `_build_cache` (the prefill), then `call_with_cache` one token at a time exactly as `generate_step`'s `next`
    does (step t feeds the token before position n + t at cache index T + n - 1 + t; step 0 recomputes the last
    prompt token).

    Returns per row (step logits float32[N, V], {k_cache, v_cache point: float32[T + n + N - 1, K, H]}): the cache
    slots written, keys with keras-hub's head-dim interleave undone (after RoPE it orders each head as x1_0, x2_0,
    x1_1, x2_1, ...; the half-split layout is [x1 ; x2])."""
    lm = keras_hub.models.PaliGemmaCausalLM(backbone=bb, preprocessor=None)
    prefill = jax.jit(lambda ids, images, mask: lm._build_cache(ids, bb.vit_encoder(images), mask)[1])
    step = jax.jit(lambda ids, cache, index: lm.call_with_cache(ids, cache, index)[::2])
    t_img, h, new = cfg.num_image_tokens, cfg.text.head_dim, tokens.shape[1]
    half_split = np.argsort(np.stack([np.arange(h // 2), np.arange(h // 2) + h // 2], -1).reshape(-1))
    rows = []
    for r in range(tokens.shape[0]):
        n, batch = _row(inputs, r, inputs["text"].shape[1] + new)  # one shape for every row: one compilation
        ids = batch["token_ids"]
        ids[0, n : n + new] = tokens[r]
        cache = prefill(ids, batch["images"], batch["padding_mask"])
        logits = []
        for t in range(new):
            out, cache = step(ids[:, n - 1 + t : n + t], cache, t_img + n - 1 + t)
            logits.append(np.asarray(out, dtype=np.float32)[0, 0])
        cache = np.asarray(cache, dtype=np.float32)[0, :, :, : t_img + n + new - 1]  # [L, 2, S, K, H]
        caches = {}
        for i in range(cfg.text.depth):
            caches[points.llm_k_cache(i)] = cache[i, 0][..., half_split]
            caches[points.llm_v_cache(i)] = cache[i, 1]
        rows.append((np.stack(logits), caches))
    return rows
