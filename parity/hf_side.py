"""transformers' PaliGemmaForConditionalGeneration as a third implementation (`--impl transformers`, a compare side).

It implements parity.backend.Backend (`BACKEND`, the registry's "transformers"; not a BlockBackend: its layers are
not run one by one here) so parity.pipeline drives it like the others: eager attention, weights mapped by
`parity.spec.to_hf` (with the vocabulary padding rows), `token_type_ids` from `mask_ar`, `<image>` placeholder ids
and NCHW pixels built from the inputs file, and forward hooks that record our capture points from transformers'
modules. Forward passes and decoding run under the `transformers` convention only; a training step
(parity.hf_train, parity.hf_backward) runs under big_vision's too (`--convention big_vision`).
transformers is imported inside the functions: nothing here is loaded unless this side is asked for.

Logits: transformers scores the padded vocabulary (config.hf_vocab_rows). `forward` returns the real rows, and
the backend's `notes` say whether the argmax at any real position ever fell in the padding rows.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import warnings
from typing import Any

import numpy as np

from converters.hf_config import to_hf_config
from parity import points, spec
from parity.backend import DTYPES, PRECISIONS, Backend, TrainPointsBackend
from parity.config import PaliGemmaConfig
from parity.conventions import PRESETS, Conventions
from parity.errors import ConfigError
from parity.hf_backward import train_points  # noqa: F401  (backend.TrainPointsBackend; documented there)
from parity.hf_train import train_step as _train_step

TRAINS_UNDER = ("transformers", "big_vision")  # the presets whose forward fields build_model accepts

# On-disk (spec) names -> transformers 5.x in-memory module names.
_RENAMES = (
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("language_model.model.", "model.language_model."),
)


@dataclasses.dataclass
class HFModel:
    """The transformers module with the config it was built from and what the last forward noticed."""

    module: Any
    config: PaliGemmaConfig
    notes: dict = dataclasses.field(default_factory=dict)
    conventions: Conventions | None = None  # with the training-only fields (conventions.TRAIN_FIELDS) as asked
    precision: str = "highest"  # torch's float32 matmul precision inside each call (nothing process-wide)


def in_precision(fn):
    """Run `fn(model, ...)` under the model's matmul precision, restored after (as torch_impl's calls do)."""

    @functools.wraps(fn)
    def run(model: HFModel, *args, **kwargs):
        from parity.torch_impl.api import matmul_precision

        with matmul_precision(model.precision):
            return fn(model, *args, **kwargs)

    return run


train_step = in_precision(_train_step)  # the backend's training step


def hf_module(cfg: PaliGemmaConfig, params: dict[str, np.ndarray]):
    """PaliGemmaForConditionalGeneration (eager, float32, CPU) from `to_hf_config`, loaded from `spec.to_hf`, with
    no missing key but the tied lm_head and no unexpected key."""
    import torch
    import transformers

    from parity.torch_impl.load import to_torch

    d = to_hf_config(cfg)
    d.pop("parity_config")
    hc = transformers.PaliGemmaConfig(**d)
    for c in (hc, hc.text_config, hc.vision_config):
        c._attn_implementation = "eager"
    model = transformers.PaliGemmaForConditionalGeneration(hc).eval()
    state = {}
    for key, x in spec.to_hf(cfg, params).items():
        for old, new in _RENAMES:
            if key.startswith(old):
                key = new + key[len(old) :]
        state[key] = to_torch(x).to(torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or not set(missing) <= {"lm_head.weight"}:
        raise AssertionError(
            f"spec.to_hf does not cover transformers' PaliGemma: missing {missing}, unexpected {unexpected}"
        )
    model.tie_weights()
    return model


def build_model(
    config: PaliGemmaConfig,
    conventions: Conventions,
    dtype: str = "float32",
    device: str = "cpu",
    params: dict[str, np.ndarray] | None = None,
    precision: str = "highest",
    **impl_kw,
) -> HFModel:
    """The transformers model in `dtype` on `device`, under the forward fields of the `transformers` preset or (for a
    training step only: `forward` and `generate` refuse it) of `big_vision`'s. Under a convention whose final
    softcap is not on every logit (big_vision's "decode_only": it trains on uncapped logits) the module is built
    with `final_logit_softcapping` None, so transformers' own head gives uncapped logits. The training-only fields
    (conventions.TRAIN_FIELDS) are read by the training step."""
    import torch

    trains = {n: PRESETS[n].forward_dict() for n in TRAINS_UNDER}
    if conventions.forward_dict() not in trains.values():
        diff = sorted(k for k, v in conventions.forward_dict().items() if v != trains["transformers"][k])
        raise ConfigError(
            f"the transformers side runs under the 'transformers' convention (and trains under 'big_vision' too); "
            f"got {', '.join(f'{k}={conventions.to_dict()[k]!r}' for k in diff)}; pass --convention transformers"
        )
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    if dtype == "float64":  # measured: 5e-7 from torch float64 on tiny-pg2-gqa (tests/test_float64.py)
        raise ConfigError(
            "transformers cannot run as float64: its Gemma/SigLIP code computes softmax, RMSNorm and RoPE in float32 "
            "whatever the model dtype; use torch or jax for a float64 side"
        )
    if impl_kw:
        raise ConfigError(f"the transformers side takes no options {sorted(impl_kw)}")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    params = params if params is not None else spec.random_params(config, scale=0.0)
    module = hf_module(config, params).to(device=device, dtype=getattr(torch, dtype))
    if conventions.final_softcap != "always":
        module.config.get_text_config().final_logit_softcapping = None
    return HFModel(module, config, conventions=conventions, precision=precision)


def check_forward_convention(model: HFModel) -> None:
    """ConfigError unless the model was built under the transformers preset's forward fields: what transformers'
    own masks, positions and head compute (a big_vision-built model is for a training step only)."""
    conv = model.conventions
    if conv is not None and conv.forward_dict() != PRESETS["transformers"].forward_dict():
        raise ConfigError(
            "the transformers side runs forward passes and decoding under the 'transformers' convention only "
            f"(it trains under 'big_vision' too), got {conv.forward_dict()}; pass --convention transformers"
        )


def hf_batch(cfg: PaliGemmaConfig, inputs: dict[str, np.ndarray], device: str = "cpu") -> dict[str, Any]:
    """Our right-padded [image ; text] batch in transformers' terms (image placeholder ids, token_type_ids)."""
    import torch

    b, t = inputs["text"].shape[0], cfg.num_image_tokens
    ids = np.concatenate([np.full((b, t), cfg.image_token_id), inputs["text"]], axis=1)
    mask = np.concatenate([np.ones((b, t)), inputs.get("mask_input", np.ones_like(inputs["text"]))], axis=1)
    ttype = np.concatenate([np.zeros((b, t)), inputs["mask_ar"]], axis=1)
    return dict(
        input_ids=torch.as_tensor(ids, dtype=torch.long, device=device),
        pixel_values=torch.as_tensor(inputs["image"], device=device).permute(0, 3, 1, 2).contiguous(),
        attention_mask=torch.as_tensor(mask, dtype=torch.long, device=device),
        token_type_ids=torch.as_tensor(ttype, dtype=torch.long, device=device),
    )


def _hooks(module, cfg: PaliGemmaConfig, out: dict) -> list:
    """Forward hooks recording each capture point from the transformers module that computes it."""
    hooks = []

    def record(mod, name, fn=lambda o: o):
        def hook(_m, _args, output):
            out[name] = fn(output[0] if isinstance(output, tuple) else output)

        hooks.append(mod.register_forward_hook(hook))

    vt, lm = module.model.vision_tower, module.model.language_model
    record(vt.embeddings.patch_embedding, points.IMG_PATCH_EMBED, lambda o: o.flatten(2).transpose(1, 2))
    record(vt.embeddings, points.IMG_POS_EMBED)
    for i, layer in enumerate(vt.encoder.layers):
        record(layer.self_attn, points.img_block_attn(i))
        record(layer, points.img_block_out(i))
    record(vt.post_layernorm, points.IMG_FINAL_NORM)
    record(module.model.multi_modal_projector, points.PROJECTOR)
    hooks.append(
        lm.register_forward_pre_hook(
            lambda _m, _a, kw: out.__setitem__(points.LLM_INPUT, kw["inputs_embeds"]), with_kwargs=True
        )
    )
    for i, layer in enumerate(lm.layers):
        record(layer.post_attention_layernorm if cfg.text.gemma2 else layer.self_attn, points.llm_block_attn(i))
        record(layer.post_feedforward_layernorm if cfg.text.gemma2 else layer.mlp, points.llm_block_mlp(i))
        record(layer, points.llm_block_out(i))
    record(lm.norm, points.LLM_FINAL_NORM)
    return hooks


@in_precision
def forward(
    model: HFModel, inputs: dict[str, np.ndarray], points_wanted: list[str] | None = None
) -> dict[str, np.ndarray]:
    """The wanted points (None = logits only) that have a counterpart in transformers, as float32 numpy; logits
    restricted to the real vocabulary rows. Notes the padding-row argmax check in `model.notes`."""
    import torch

    from parity.inputs import validate_inputs

    check_forward_convention(model)
    cfg = model.config
    wanted = [points.LOGITS] if points_wanted is None else list(points_wanted)
    inputs = validate_inputs(inputs, cfg, "inputs")
    device = next(model.module.parameters()).device
    out: dict[str, Any] = {}
    hooks = _hooks(model.module, cfg, out)
    try:
        with torch.no_grad():
            padded = model.module(**hf_batch(cfg, inputs, device)).logits
    finally:
        for h in hooks:
            h.remove()
    out[points.LOGITS] = padded[..., : cfg.text.vocab_size]
    valid = np.concatenate(
        [np.ones((padded.shape[0], cfg.num_image_tokens), bool), inputs["mask_input"].astype(bool)], axis=1
    )
    in_padding = (padded.argmax(-1).cpu().numpy() >= cfg.text.vocab_size) & valid
    model.notes["vocab_padding"] = {
        "rows": int(padded.shape[-1] - cfg.text.vocab_size),
        "positions": int(valid.sum()),
        "argmax_in_padding": int(in_padding.sum()),
    }
    # float32 points; a float64 model's stay float64
    return {
        k: out[k].detach().to(torch.promote_types(out[k].dtype, torch.float32)).cpu().numpy()
        for k in wanted
        if k in out
    }


def resolve_device(device: str) -> str:
    """transformers runs on torch: torch's device rules."""
    from parity.torch_impl import api as torch_api

    return torch_api.resolve_device(device)


def device_description(device: str) -> str:
    from parity.torch_impl import api as torch_api

    return torch_api.device_description(device)


@in_precision
def generate(
    model: HFModel,
    inputs: dict[str, np.ndarray],
    max_new_tokens: int,
    greedy: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    eos_id: int = 1,
    return_logits: bool = False,
    capture: list[str] | None = None,
    compile: str | None = None,
    ignore_eos: bool = False,
    forced_tokens: np.ndarray | None = None,
) -> dict[str, Any]:
    """Greedy decoding as transformers defines it, row by row (batch 1, no padding, so transformers' own positions
    and masks apply): step t is the last-position logits of a full forward of the row's real prompt plus the tokens
    fed so far (its own picks, or `forced_tokens`); generated tokens are suffix (token_type 1, causal). Cache points
    come from a last forward into a plain `DynamicCache` (every layer whole, sliding ones included), laid out in our
    slot scheme [B, P + N, K, H]: slots 0..P_b-1 the row's prompt, P..P+N-2 the fed tokens, zero elsewhere (our
    implementations' padding slots hold values no query sees; compare them only at real slots). Same returns as
    torch_impl.api.generate; logits restricted to the real vocabulary rows."""
    import torch
    import transformers

    from parity.inputs import validate_inputs

    if not greedy:
        raise ConfigError(
            "the transformers side decodes greedily only (sampled streams differ between implementations anyway)"
        )
    check_forward_convention(model)
    cfg = model.config
    inputs = validate_inputs(inputs, cfg, "inputs")
    capture = list(capture or ())
    unknown = sorted(set(capture) - set(points.cache_points(cfg)))
    if unknown:
        raise ConfigError(f"the transformers side's generate captures only cache points; asked for {unknown}")
    device = next(model.module.parameters()).device
    b, length = inputs["text"].shape
    t_img, size = cfg.num_image_tokens, cfg.num_image_tokens + length + max_new_tokens
    tokens = np.zeros((b, max_new_tokens), np.int32)
    logits = np.zeros((b, max_new_tokens, cfg.text.vocab_size), np.float32)
    t_cfg = cfg.text
    caches = {name: np.zeros((b, size, t_cfg.num_kv_heads, t_cfg.head_dim), np.float32) for name in capture}
    steps = max_new_tokens
    for row in range(b):
        n_real = int(inputs["mask_input"][row].sum())
        one = {
            "image": inputs["image"][row : row + 1],
            "text": inputs["text"][row : row + 1, :n_real],
            "mask_ar": inputs["mask_ar"][row : row + 1, :n_real],
        }
        one["mask_input"] = np.ones_like(one["text"])
        fed: list[int] = []
        for t in range(max_new_tokens):
            batch = hf_batch(cfg, one, device)
            extra = torch.as_tensor([fed], dtype=torch.long, device=device).reshape(1, -1)
            batch = {
                "input_ids": torch.cat([batch["input_ids"], extra], 1),
                "pixel_values": batch["pixel_values"],
                "attention_mask": torch.cat([batch["attention_mask"], torch.ones_like(extra)], 1),
                "token_type_ids": torch.cat([batch["token_type_ids"], torch.ones_like(extra)], 1),
            }
            last = t == max_new_tokens - 1
            cache = transformers.DynamicCache() if last and capture else None
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # past_key_values renamed in later releases
                out = model.module(**batch, use_cache=cache is not None, past_key_values=cache, logits_to_keep=1)
            step = out.logits[0, -1, : cfg.text.vocab_size].float().cpu().numpy()
            logits[row, t] = step
            tokens[row, t] = int(step.argmax())
            fed.append(int(forced_tokens[row, t]) if forced_tokens is not None else int(tokens[row, t]))
            if cache is not None:
                prompt = t_img + n_real
                for i in range(t_cfg.depth):
                    for name, kv in (
                        (points.llm_k_cache(i), cache.layers[i].keys),
                        (points.llm_v_cache(i), cache.layers[i].values),
                    ):
                        if name in caches:
                            x = kv[0].transpose(0, 1).float().cpu().numpy()  # [S_row, K, H]
                            caches[name][row, :prompt] = x[:prompt]
                            caches[name][row, t_img + length : t_img + length + t] = x[prompt:]
    if not ignore_eos:  # stop rows at eos as the implementations do: zeros after it, steps while any row runs
        done = np.zeros(b, bool)
        for t in range(max_new_tokens):
            tokens[done, t] = 0
            done |= tokens[:, t] == eos_id
            if done.all():
                steps = t + 1
                break
    result: dict[str, Any] = {"tokens": tokens, "decode_path": "transformers: a full forward per step"}
    if return_logits:
        result["logits"] = logits[:, :steps]
    result.update(caches)
    return result


# -- the backend: this module is a parity.backend.Backend (the registry's "transformers") -------------------------
name = "transformers"
build_options: tuple[str, ...] = ()


def speed_warning(dtype: str, device: str) -> str | None:
    return None


def manifest(model: HFModel) -> dict[str, Any]:
    return {}


def notes(model: HFModel) -> dict[str, Any]:
    """What the last forward noticed beyond the capture points (the vocabulary padding rows' argmax check)."""
    return dict(model.notes)


BACKEND = sys.modules[__name__]  # the module itself: its functions are the protocol's methods
assert isinstance(BACKEND, Backend)
assert isinstance(BACKEND, TrainPointsBackend)
