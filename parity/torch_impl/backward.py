"""The training step point by point (`parity compare --train-step`): the training forward of parity/torch_impl/train.py
run unit by unit (points.train_units), with its forward points, the loss, the gradient at every unit boundary and
every trainable leaf's gradient; and one unit's VJP on given inputs (the teacher-forced backward).

The activation gradients come from zero "probes" added at every unit input (x + 0 is x exactly, so nothing changes):
torch.autograd.grad of the loss with respect to the probes and the trainable parameters at once, so the gradient
reaches every boundary whether or not a parameter below it trains. Numpy in, numpy out. --frozen-dtype float16 runs
train.py's own mixed precision: its `_half` frozen values and `_text_embedding` float16 text tokens (joined at the LLM
input unit as train._loss joins them). Mirrored definition for definition by parity/jax_impl/backward.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from parity import points as pts
from parity import spec, training
from parity.errors import ConfigError
from parity.inputs import validate_inputs
from parity.torch_impl import train
from parity.torch_impl.decoder import block_mask
from parity.torch_impl.load import torch_names
from parity.torch_impl.precision import matmul_precision
from parity.training import TrainOptions


def train_points(model, inputs: dict[str, np.ndarray], options: TrainOptions) -> dict[str, np.ndarray]:
    """Every point of points.train_points for this model and `options` (float32 numpy; the losses as arrays: shape
    () and [B]). The model's trainable leaves are updated in place when options.steps > 1."""

    _check(model, options)
    batch = train._batch(model, inputs)
    names = training.trainable_leaves(options, [e.key for e in spec.entries(model.config)])
    leaves = train._leaves(model, names)
    if options.frozen_dtype == "float16" and training.EMBEDDING not in leaves:  # train.py's float16 text tokens
        batch["text_embedding"] = train._text_embedding(model, batch["text"])
    out: dict[str, Any] = {}
    probes: dict[str, torch.Tensor] = {}
    with matmul_precision(model.precision), train._half(model, leaves, options):
        ctx = _context(model, batch)
        x = None
        for unit, _, grad_in, _ in pts.train_units(model.config):
            if grad_in is not None:
                probes[grad_in] = torch.zeros_like(x, requires_grad=True)
                x = x + probes[grad_in]
            x, aux = _unit(model, unit, x, ctx)
            out.update(aux)
        params = [p for ps in leaves.values() for p in ps]
        flat = torch.autograd.grad(x, list(probes.values()) + params)
    out.update(zip(probes, flat[: len(probes)], strict=True))
    grads, at = {}, len(probes)
    for key, ps in leaves.items():
        grads[key], at = list(flat[at : at + len(ps)]), at + len(ps)
    result = {k: _numpy(v) for k, v in out.items()}
    result.update(_leaf_points(model, _canonical(model, grads)))
    if options.steps > 1:
        later = train.train_step(model, inputs, options)
        result.update({pts.train_loss_at(r.step): np.asarray(r.loss, np.float32) for r in later.steps[1:]})
        result.update({pts.param_at(k, options.steps): v for k, v in later.params.items()})
    return result


def unit_vjps(
    model, inputs: dict[str, np.ndarray], options: TrainOptions, given: dict[str, np.ndarray]
) -> dict[str, dict[str, np.ndarray]]:
    """Every unit of the training step (points.train_units) run on another run's points `given` (its input's
    forward point, and d loss / d its output: the next unit's input gradient; the head with the loss takes no
    upstream): {unit: its forward points, its input's gradient point and the gradient points of its trainable
    parameters (one layer of a stacked leaf; a whole leaf's share from this unit otherwise)}, float32 numpy."""

    _check(model, options)
    batch = train._batch(model, inputs)
    names = training.trainable_leaves(options, [e.key for e in spec.entries(model.config)])
    leaves = train._leaves(model, names)
    if options.frozen_dtype == "float16" and training.EMBEDDING not in leaves:  # train.py's float16 text tokens
        batch["text_embedding"] = train._text_embedding(model, batch["text"])
    result = {}
    with matmul_precision(model.precision), train._half(model, leaves, options):
        ctx = _context(model, batch)
        for unit, x, grad_in, grad_out in pts.train_units(model.config):
            owned = _owned(model, unit, leaves)
            xt = None if x is None else _input(model, given[x]).requires_grad_(True)
            y, aux = _unit(model, unit, xt, ctx)
            wrt = ([xt] if xt is not None else []) + [p for _, p in owned]
            cot = None if grad_out is None else _input(model, given[grad_out])
            flat = torch.autograd.grad(y, wrt, grad_outputs=cot, allow_unused=True) if wrt else ()
            r = {k: _numpy(v) for k, v in aux.items()}
            if xt is not None:
                r[grad_in] = _numpy(flat[0])
            for (point, p), g in zip(owned, flat[len(wrt) - len(owned) :], strict=True):
                r[point] = _numpy(torch.zeros_like(p) if g is None else g)
            result[unit] = r
    return result


def _check(model, options: TrainOptions) -> None:
    """The options this point-by-point step runs: float32 (or float64) activations, the frozen leaves float32 or
    rounded as train.py's `--frozen-dtype float16` rounds them (train._half, train._text_embedding)."""
    options.check()
    if options.vit_matmul_dtype != "float32":
        raise ConfigError(
            f"compare --train-step --vit-matmul-dtype {options.vit_matmul_dtype}: the point-by-point step runs float32 "
            "ViT activations only (--frozen-dtype float16 runs)"
        )


def _context(model, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What the units read besides their input: the image, the text, the masks and RoPE angles of the training
    forward (no input mask; the convention's prefix), targets and loss weights."""
    conv = model.conventions
    no_input_mask = torch.ones_like(batch["text"])
    _, _, positions, masks = model.full_masks(batch["mask_ar"], no_input_mask, causal=conv.train_prefix == "causal")
    angles = model.llm.angles(positions, model.llm.final_norm.scale.dtype)
    return {**batch, "masks": masks, "angles": angles}


def _block(model, tower: str, i: int):
    """Block i of the ViT ("img") or the LLM ("llm")."""
    return model.img.Transformer.encoderblock[i] if tower == "img" else model.llm.layers[i]


def _unit(model, unit: str, x, ctx: dict[str, Any]):
    """(the unit's output, {forward point: tensor}) of one unit of points.train_units on x, as the training
    forward of train.py computes it; the head's output is the loss (its points: the logits, the losses)."""
    if unit == pts.STEM:
        e = model.img.embedding(ctx["image"].to(model.img.pos_embedding.dtype))
        y = e + model.img.pos_embedding
        return y, {pts.IMG_PATCH_EMBED: e, pts.IMG_POS_EMBED: y}
    if unit.startswith(("img/block", "llm/layer")):
        tower, i = unit[:3], int(unit[-2:])
        if tower == "img":
            y, aux = _block(model, tower, i)(x)
            return y, {name(i): aux[k] for k, name in pts.IMG_BLOCK_POINTS.items()}
        local = model.llm.local_layers()[i]
        y, aux, _ = _block(model, tower, i)(
            x, ctx["angles"], block_mask(ctx["masks"], local), attn_softcap=model.attn_softcap
        )
        return y, {name(i): aux[k] for k, name in pts.LLM_BLOCK_POINTS.items()}
    if unit == pts.LOGITS:
        logits = model.llm.logits(x, capped=model.conventions.final_softcap == "always")
        text_logits = logits[:, model.config.num_image_tokens :]
        logp = torch.log_softmax(text_logits, dim=-1)
        nll = -torch.gather(logp, -1, ctx["targets"][..., None])[..., 0]
        w = ctx["weights"].to(nll.dtype)
        loss, example = training.normalize((nll * w).sum(1), w.sum(1), model.conventions.loss_normalization)
        return loss, {pts.LOGITS: logits, pts.TRAIN_LOSS: loss, pts.TRAIN_EXAMPLE_LOSS: example}
    if unit == pts.LLM_INPUT and "text_embedding" in ctx:  # train._loss: [image ; float16 text], then float32
        y = torch.cat([x, ctx["text_embedding"]], dim=1).to(ctx["image"].dtype)
        return y, {unit: y}
    y = model.unit(unit, x, ctx["text"])
    return y, {unit: y}


def _owned(model, unit: str, leaves: dict[str, list]) -> list[tuple[str, Any]]:
    """(gradient point, parameter) of every trainable parameter of `unit`."""
    layers = {e.key: e.layers for e in spec.entries(model.config)}
    owned = []
    for key, ps in leaves.items():
        if layers[key] is not None and unit.startswith(("img/block", "llm/layer")):
            i = int(unit[-2:])
            if unit in pts.leaf_unit(key, i):
                owned.append((pts.grad_leaf(key, i), ps[i]))
        elif layers[key] is None and unit in pts.leaf_unit(key):
            owned.append((pts.grad_leaf(key), ps[0]))
    return owned


def _canonical(model, grads: dict[str, list[torch.Tensor]]) -> dict[str, np.ndarray]:
    """{key: numpy in canonical layout}, float32 (float64 for a float64 model): per-layer tensors stacked."""
    layers = {e.key: e.layers for e in spec.entries(model.config)}
    return {k: np.stack([_numpy(t) for t in ts]) if layers[k] else _numpy(ts[0]) for k, ts in grads.items()}


def _leaf_points(model, grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """grad/<leaf> for every trainable leaf, and grad/<leaf>/layerNN for each layer of a stacked one."""
    layers = {e.key: e.layers for e in spec.entries(model.config)}
    out = {}
    for key, g in grads.items():
        out[pts.grad_leaf(key)] = g
        out.update({pts.grad_leaf(key, i): g[i] for i in range(layers[key] or 0)})
    return out


def _input(model, x: np.ndarray) -> torch.Tensor:
    p = model.llm.final_norm.scale
    return torch.as_tensor(np.asarray(x, np.float64 if p.dtype == torch.float64 else np.float32), device=p.device).to(
        p.dtype
    )


def _numpy(x: torch.Tensor) -> np.ndarray:
    """float32 numpy; float64 stays float64."""
    return x.detach().to(torch.promote_types(x.dtype, torch.float32)).cpu().numpy()


# -- the block-streamed step (parity/stream_train.py drives these on a streamed skeleton, torch_impl/stream.py) -------
def stream_context(model, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """`_context` of the shifted training batch on a streamed skeleton's device (its parameters are on meta)."""
    from parity.torch_impl import stream

    checked = validate_inputs({k: v for k, v in inputs.items() if k != "mask_loss"}, model.config, "inputs")
    shifted = training.shift({**checked, "mask_loss": inputs["mask_loss"]})
    batch = {k: stream._ints(model, v) for k, v in shifted.items() if k != "image"}
    batch["image"] = stream._input(model, shifted["image"])
    with torch.no_grad():
        return _context(model, batch)


def stream_unit(model, weights: dict[str, np.ndarray], unit: str, x, ctx: dict[str, Any], cot=None, train=()):
    """Unit `unit` of points.train_units (not the head) on x with `weights` placed (the LLM input: the rows of
    ctx["text"]'s tokens, indexed by `local` in ctx): its output; given `cot` (d loss / d output), its VJP instead:
    (d loss / d x or None, {key in `train`: its gradient}), recomputing the unit's forward (float32 numpy)."""
    from parity.torch_impl import stream

    layer = int(unit[-2:]) if unit.startswith(("img/block", "llm/layer")) else None
    if unit == pts.LLM_INPUT:
        ctx = {**ctx, "text": stream._ints(model, ctx["local"])}
    names = {k: torch_names(k, None if layer is None else layer + 1)[-1] for k in weights if k in train}
    with stream._placed(model, weights, layer), matmul_precision(model.precision), torch.enable_grad():
        params = {k: model.get_parameter(n).requires_grad_(True) for k, n in names.items()}
        xt = None if x is None else stream._input(model, x).requires_grad_(cot is not None)
        if cot is None:
            with torch.no_grad():
                return _numpy(_unit(model, unit, xt, ctx)[0])
        y, _ = _unit(model, unit, xt, ctx)
        wrt = ([] if xt is None else [xt]) + list(params.values())
        flat = torch.autograd.grad(y, wrt, grad_outputs=stream._input(model, cot), allow_unused=True)
    dx = None if xt is None else _numpy(flat[0])
    grads = dict(zip(params, flat[len(wrt) - len(params) :], strict=True))
    return dx, {k: _numpy(torch.zeros_like(params[k]) if g is None else g) for k, g in grads.items()}


def stream_head(model, weights: dict[str, np.ndarray], x: np.ndarray, cot=None, train: bool = False):
    """The training logits of a chunk of the embedding table's rows (`weights`) on the final-normed text positions
    x; given `cot` (d loss / d those logits), (d loss / d x, the chunk's gradient or None unless `train`)."""
    from parity.torch_impl import stream

    capped = model.conventions.final_softcap == "always"
    with stream._placed(model, weights), matmul_precision(model.precision), torch.enable_grad():
        table = model.llm.embedder.input_embedding.requires_grad_(train)
        xt = stream._input(model, x).requires_grad_(cot is not None)
        if cot is None:
            with torch.no_grad():
                return _numpy(model.llm.logits(xt, capped=capped))
        wrt = [xt, table] if train else [xt]
        flat = torch.autograd.grad(model.llm.logits(xt, capped=capped), wrt, grad_outputs=stream._input(model, cot))
    return _numpy(flat[0]), _numpy(flat[1]) if train else None


def stream_loss(model, logits: np.ndarray, ctx: dict[str, Any]) -> tuple[float, np.ndarray, np.ndarray]:
    """(loss, per-row losses, d loss / d logits) of the text logits, as `_unit`'s head forms the loss."""
    from parity.torch_impl import stream

    with torch.enable_grad():
        lt = stream._input(model, logits).requires_grad_(True)
        logp = torch.log_softmax(lt, dim=-1)
        nll = -torch.gather(logp, -1, ctx["targets"][..., None])[..., 0]
        w = ctx["weights"].to(nll.dtype)
        loss, example = training.normalize((nll * w).sum(1), w.sum(1), model.conventions.loss_normalization)
        (g,) = torch.autograd.grad(loss, [lt])
    return float(loss.detach()), _numpy(example), _numpy(g)
