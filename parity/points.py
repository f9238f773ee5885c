"""Names of the capture points: one list shared by both implementations (never retyped as strings).

Each implementation calls these functions/constants where it records an activation, so the same name means the
same tensor in PyTorch and in JAX. Shapes (B batch, T image tokens, S = T + text length):
  img/*           float[B, T, Dv]   (IMG_PATCH_EMBED before the position embedding is added)
  PROJECTOR       float[B, T, D]
  llm/*           float[B, S, D]
  LOGITS          float[B, S, V]
  llm/layerNN/k_cache, v_cache   float[B, S_cache, K, H]   (generation only)
"""

from __future__ import annotations

import difflib
import fnmatch
import re

from parity.config import PaliGemmaConfig
from parity.errors import ConfigError

IMG_PATCH_EMBED = "img/patch_embed"
IMG_POS_EMBED = "img/with_posemb"
IMG_FINAL_NORM = "img/encoder_norm"
PROJECTOR = "img/projector"
LLM_INPUT = "llm/input_embeddings"
LLM_FINAL_NORM = "llm/final_norm"
LOGITS = "logits"


def img_block_attn(i: int) -> str:
    """Output of the attention branch of ViT block i (before the residual add)."""
    return f"img/block{i:02d}/attn"


def img_block_out(i: int) -> str:
    """Residual stream after ViT block i."""
    return f"img/block{i:02d}/out"


def llm_block_attn(i: int) -> str:
    """Output of the attention branch of LLM block i (after the post-attention norm in Gemma 2)."""
    return f"llm/layer{i:02d}/attn"


def llm_block_mlp(i: int) -> str:
    """Output of the MLP branch of LLM block i (after the post-ffw norm in Gemma 2)."""
    return f"llm/layer{i:02d}/mlp"


def llm_block_out(i: int) -> str:
    """Residual stream after LLM block i."""
    return f"llm/layer{i:02d}/out"


# Per-layer points of a block, by the name a block returns them under (its output and named intermediates):
# the model-level code records block i's `aux[kind]` as `BLOCK_POINTS[kind](i)`.
IMG_BLOCK_POINTS = {"attn": img_block_attn, "out": img_block_out}
LLM_BLOCK_POINTS = {"attn": llm_block_attn, "mlp": llm_block_mlp, "out": llm_block_out}


def llm_k_cache(i: int) -> str:
    return f"llm/layer{i:02d}/k_cache"


def llm_v_cache(i: int) -> str:
    return f"llm/layer{i:02d}/v_cache"


def forward_points(config: PaliGemmaConfig) -> list[str]:
    """Every point of a forward pass, in the order the model computes them."""
    pts = [IMG_PATCH_EMBED, IMG_POS_EMBED]
    for i in range(config.vision.depth):
        pts += [img_block_attn(i), img_block_out(i)]
    pts += [IMG_FINAL_NORM, PROJECTOR, LLM_INPUT]
    for i in range(config.text.depth):
        pts += [llm_block_attn(i), llm_block_mlp(i), llm_block_out(i)]
    return pts + [LLM_FINAL_NORM, LOGITS]


def graph_units(config: PaliGemmaConfig) -> dict[str, str]:
    """The units of the graph between and after the blocks, each by its output point -> its input point, in forward
    order: the ViT's final norm, the projector, the image/text concatenation with the sqrt(D) embedding scale of the
    text tokens (its other input: the inputs' text), the LLM's final norm and the head (logits, softcapped as the
    forward pass does). With the stem (nothing upstream but the image) and the blocks they make the whole graph:
    what `compare --teacher-forced` runs one by one on side A's captured inputs (backend.UnitBackend.unit)."""
    v, t = config.vision.depth, config.text.depth
    return {
        IMG_FINAL_NORM: img_block_out(v - 1) if v else IMG_POS_EMBED,
        PROJECTOR: IMG_FINAL_NORM,
        LLM_INPUT: PROJECTOR,
        LLM_FINAL_NORM: llm_block_out(t - 1) if t else LLM_INPUT,
        LOGITS: LLM_FINAL_NORM,
    }


def cache_points(config: PaliGemmaConfig) -> list[str]:
    return [p for i in range(config.text.depth) for p in (llm_k_cache(i), llm_v_cache(i))]


def shapes(
    config: PaliGemmaConfig, batch: int | str = "B", text_len: int | str = "L", new_tokens: int | str = "N"
) -> dict[str, tuple[int | str, ...]]:
    """Every point (forward points, then the generation-only cache points) with its shape; an axis is a number, or
    a letter/sum when not given (B batch, L text length, N new tokens)."""
    t, v, d = config.num_image_tokens, config.vision.width, config.text.width
    s = t + text_len if isinstance(text_len, int) else f"{t}+{text_len}"
    cache = (
        t + text_len + new_tokens if isinstance(text_len, int) and isinstance(new_tokens, int) else f"{s}+{new_tokens}"
    )
    out: dict[str, tuple[int | str, ...]] = {}
    for name in forward_points(config):
        if name == LOGITS:
            out[name] = (batch, s, config.text.vocab_size)
        elif name.startswith("img/") and name != PROJECTOR:
            out[name] = (batch, t, v)
        elif name == PROJECTOR:
            out[name] = (batch, t, d)
        else:
            out[name] = (batch, s, d)
    for name in cache_points(config):
        out[name] = (batch, cache, config.text.num_kv_heads, config.text.head_dim)
    return out


def _padded(name: str) -> str:
    """Layer/block numbers written with two digits, as the point names have them (llm/layer1 -> llm/layer01)."""
    return re.sub(r"(?<=layer|block)(\d)(?!\d)", r"0\1", name)


def suggest(pattern: str, points: list[str]) -> list[str]:
    """Names a pattern that matches nothing probably meant (a near miss: llm/layer1/out -> llm/layer01/out)."""
    fixed = _padded(pattern)
    hits = [p for p in points if fnmatch.fnmatchcase(p, fixed)]
    if hits:
        return [fixed] if fixed != pattern and any(c in fixed for c in "*?[") else hits[:3]
    return difflib.get_close_matches(pattern, points, n=3, cutoff=0.75)


def select(points: list[str], patterns: str | list[str] | None) -> list[str]:
    """Points matching any glob (comma-separated string or list), in model order; None selects all. `logits` is
    always kept. A pattern that matches nothing is an error (ConfigError, with the near misses it resembles)."""
    if patterns is None:
        return list(points)
    pats = [p.strip() for p in (patterns.split(",") if isinstance(patterns, str) else patterns) if p.strip()]
    if not pats:
        raise ConfigError(
            f"--points {patterns!r} names no pattern (e.g. 'llm/layer0*/attn', 'img/*'; "
            f"`parity points CKPT` lists them)"
        )
    for g in pats:
        if not any(fnmatch.fnmatchcase(p, g) for p in points):
            near = suggest(g, points)
            hint = f"did you mean {' or '.join(near)}?" if near else "`parity points CKPT` lists them"
            raise ConfigError(f"--points pattern {g!r} matches no capture point; {hint}", key=g)
    chosen = [p for p in points if any(fnmatch.fnmatchcase(p, g) for g in pats)]
    if LOGITS in points and LOGITS not in chosen:
        chosen.append(LOGITS)
    return chosen


# -- the training step (`compare --train-step`): its loss, the gradients at every unit boundary, the parameters ------
# A gradient point `grad/P` is d loss / d (forward point P); `grad/U/in` is d loss / d (the input of unit U). The
# backward units are the forward units plus the head with the loss (`logits`); `train_units` lists them.
TRAIN_LOSS = "train/loss"
TRAIN_EXAMPLE_LOSS = "train/example_loss"
GRAD_HEAD_IN = "grad/llm/final_norm"  # the head's input: the final norm's output
GRAD_FINAL_NORM_IN = "grad/llm/final_norm/in"
GRAD_PROJECTOR = "grad/img/projector"  # the image input of the image/text concatenation
GRAD_PROJECTOR_IN = "grad/img/projector/in"
GRAD_IMG_FINAL_NORM_IN = "grad/img/encoder_norm/in"
STEM = "img/stem"  # the patch embedding and the position embedding: the unit whose input is the image


def grad_llm_block_in(i: int) -> str:
    """d loss / d (the input of LLM block i)."""
    return f"grad/llm/layer{i:02d}/in"


def grad_img_block_in(i: int) -> str:
    """d loss / d (the input of ViT block i)."""
    return f"grad/img/block{i:02d}/in"


def grad_leaf(key: str, layer: int | None = None) -> str:
    """The gradient of a parameter leaf (canonical key), or of one layer of a stacked leaf."""
    return f"grad/{key}" if layer is None else f"grad/{key}/layer{layer:02d}"


def train_loss_at(step: int) -> str:
    return f"train/loss@step{step}"


def param_at(key: str, step: int) -> str:
    """A trainable leaf after `step` SGD steps."""
    return f"param/{key}@step{step}"


def train_units(config: PaliGemmaConfig) -> list[tuple[str, str | None, str | None, str | None]]:
    """The units of a training step in forward order: (unit, its input's forward point or None for the image, the
    gradient point of its input or None, the gradient point of its output or None for the loss). A unit is named
    as verdict.py names them: a block (`img/block00`, `llm/layer00`), a unit between the blocks by its output point,
    the stem, and the head with the loss (`logits`)."""
    v, t = config.vision.depth, config.text.depth
    units: list[tuple[str, str | None, str | None, str | None]] = []
    img_in = [grad_img_block_in(i) for i in range(v)] + [GRAD_IMG_FINAL_NORM_IN]
    units.append((STEM, None, None, img_in[0]))
    for i in range(v):
        units.append((f"img/block{i:02d}", img_block_out(i - 1) if i else IMG_POS_EMBED, img_in[i], img_in[i + 1]))
    units.append(
        (IMG_FINAL_NORM, img_block_out(v - 1) if v else IMG_POS_EMBED, GRAD_IMG_FINAL_NORM_IN, GRAD_PROJECTOR_IN)
    )
    units.append((PROJECTOR, IMG_FINAL_NORM, GRAD_PROJECTOR_IN, GRAD_PROJECTOR))
    llm_in = [grad_llm_block_in(i) for i in range(t)] + [GRAD_FINAL_NORM_IN]
    units.append((LLM_INPUT, PROJECTOR, GRAD_PROJECTOR, llm_in[0]))
    for i in range(t):
        units.append((f"llm/layer{i:02d}", llm_block_out(i - 1) if i else LLM_INPUT, llm_in[i], llm_in[i + 1]))
    units.append((LLM_FINAL_NORM, llm_block_out(t - 1) if t else LLM_INPUT, GRAD_FINAL_NORM_IN, GRAD_HEAD_IN))
    units.append((LOGITS, LLM_FINAL_NORM, GRAD_HEAD_IN, None))
    return units


def leaf_unit(key: str, layer: int | None = None) -> list[str]:
    """The units whose parameters include leaf `key` (layer `layer` of a stacked one): the tied embedding is in two,
    the image/text concatenation (the lookup) and the head."""
    if key.startswith("img/Transformer/encoderblock/"):
        return [f"img/block{layer:02d}"]
    if key.startswith("llm/layers/"):
        return [f"llm/layer{layer:02d}"]
    if key.startswith("img/Transformer/encoder_norm/"):
        return [IMG_FINAL_NORM]
    if key.startswith("img/head/"):
        return [PROJECTOR]
    if key.startswith("llm/embedder/"):
        return [LLM_INPUT, LOGITS]
    if key.startswith("llm/final_norm/"):
        return [LLM_FINAL_NORM]
    return [STEM]


def backward_points(config: PaliGemmaConfig) -> list[str]:
    """The activation gradients, from the head down (the order a backward pass produces them)."""
    return [u[2] for u in reversed(train_units(config)) if u[2] is not None]


def train_points(config: PaliGemmaConfig, trainable: list[str], stacked: dict[str, int | None], steps: int = 1):
    """Every point of `compare --train-step` in the order the computation produces them: the forward points of the
    training forward, the loss, the activation gradients, the parameter gradients (whole, then per layer for the
    stacked `trainable` leaves: `stacked` maps key -> layers or None), and with steps > 1 every step's loss and the
    trainable leaves after the last step."""
    pts = forward_points(config) + [TRAIN_LOSS, TRAIN_EXAMPLE_LOSS] + backward_points(config)
    for key in trainable:
        pts.append(grad_leaf(key))
        pts += [grad_leaf(key, i) for i in range(stacked.get(key) or 0)]
    if steps > 1:
        pts += [train_loss_at(n) for n in range(2, steps + 1)] + [param_at(k, steps) for k in trainable]
    return pts


def train_point_unit(point: str) -> str | None:
    """The unit (a name of train_units) whose backward produces a gradient point, or whose head computes the loss;
    None for a whole stacked leaf's gradient and the points after later steps (no one unit computes them)."""
    if point in (TRAIN_LOSS, TRAIN_EXAMPLE_LOSS):
        return LOGITS
    for unit, _, grad_in, _ in _TRAIN_UNITS_BY_GRAD:
        if point == grad_in:
            return unit
    m = re.fullmatch(r"grad/(img|llm)/(block|layer)(\d+)/in", point)
    if m:
        return f"{m.group(1)}/{m.group(2)}{int(m.group(3)):02d}"
    m = re.fullmatch(r"grad/(.+)/layer(\d+)", point)
    if m:
        return leaf_unit(m.group(1), int(m.group(2)))[0]
    if point.startswith("grad/") and not point.startswith(("grad/img/Transformer/encoderblock/", "grad/llm/layers/")):
        return leaf_unit(point[len("grad/") :])[0]
    return None


_TRAIN_UNITS_BY_GRAD = (
    (LOGITS, None, GRAD_HEAD_IN, None),
    (LLM_FINAL_NORM, None, GRAD_FINAL_NORM_IN, None),
    (LLM_INPUT, None, GRAD_PROJECTOR, None),
    (PROJECTOR, None, GRAD_PROJECTOR_IN, None),
    (IMG_FINAL_NORM, None, GRAD_IMG_FINAL_NORM_IN, None),
)
