"""The training step point by point (`parity compare --train-step`): the training forward of parity/jax_impl/train.py
run unit by unit (points.train_units), with its forward points, the loss, the gradient at every unit boundary and
every trainable leaf's gradient; and one unit's VJP on given inputs (the teacher-forced backward).

The activation gradients come from zero "probes" added at every unit input (x + 0 is x exactly, so nothing changes):
jax.value_and_grad of the loss with respect to the probes and the trainable state at once, so the gradient reaches
every boundary whether or not a parameter below it trains. Numpy in, numpy out. --frozen-dtype float16 runs train.py's
own mixed precision: its `_half` frozen values and `_text_embedding` float16 text tokens (joined at the LLM input unit
as train._loss joins them). Mirrored definition for definition by parity/torch_impl/backward.py.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from parity import points as pts
from parity import spec, training
from parity.errors import ConfigError
from parity.inputs import validate_inputs
from parity.jax_impl import train
from parity.jax_impl.decoder import block_mask
from parity.jax_impl.load import _flat
from parity.jax_impl.precision import matmul_precision
from parity.stream import EMBED
from parity.training import TrainOptions


def train_points(model, inputs: dict[str, np.ndarray], options: TrainOptions) -> dict[str, np.ndarray]:
    """Every point of points.train_points for this model and `options` (float32 numpy; the losses as arrays: shape
    () and [B]). The model's trainable leaves are updated in place when options.steps > 1."""

    _check(model, options)
    batch = train._batch(model, inputs)
    names = training.trainable_leaves(options, [e.key for e in spec.entries(model.config)])
    graphdef, leaves, frozen = train._leaves(model, names)
    frozen = train._half(frozen, options)
    if options.frozen_dtype == "float16" and training.EMBEDDING not in names:  # train.py's float16 text tokens
        batch["text_embedding"] = train._text_embedding(model, batch["text"])
    probes = _probes(model, batch)
    with matmul_precision(model.precision):
        out, (grads, probe_grads) = _points(graphdef, leaves, frozen, batch, probes)
    result = {k: np.asarray(jax.device_get(v)) for k, v in {**out, **probe_grads}.items()}
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
    graphdef, leaves, frozen = train._leaves(model, names)
    frozen = train._half(frozen, options)
    if options.frozen_dtype == "float16" and training.EMBEDDING not in names:  # train.py's float16 text tokens
        batch["text_embedding"] = train._text_embedding(model, batch["text"])
    units = pts.train_units(model.config)
    xs = {u: model.put(_input(model, given[x])) for u, x, _, _ in units if x is not None}
    ups = {u: model.put(_input(model, given[g])) for u, _, _, g in units if g is not None}
    with matmul_precision(model.precision):
        aux, grads, gx = _vjps(graphdef, leaves, frozen, xs, ups, batch)
    result = {}
    for unit, _, grad_in, _ in units:
        r = {k: np.asarray(jax.device_get(v)) for k, v in aux[unit].items()}
        if grad_in is not None:
            r[grad_in] = np.asarray(jax.device_get(gx[unit])).astype(np.float32)
        canonical = _canonical(model, grads[unit])
        for point, key, i in _owned(model, unit, canonical):
            r[point] = canonical[key] if i is None else canonical[key][i]
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


def _context(model, batch: dict[str, jax.Array]) -> dict[str, Any]:
    """What the units read besides their input: the image, the text, the masks and RoPE angles of the training
    forward (no input mask; the convention's prefix), targets and loss weights."""
    conv = model.conventions
    no_input_mask = jnp.ones_like(batch["text"])
    _, _, positions, masks = model.full_masks(batch["mask_ar"], no_input_mask, causal=conv.train_prefix == "causal")
    angles = model.llm.angles(positions, model.llm.final_norm.scale[...].dtype)
    return {**batch, "masks": masks, "angles": angles}


def _block(model, tower: str, i: int):
    """Block i of the ViT ("img") or the LLM ("llm"): one slice of the stacked module."""
    stacked = model.img.Transformer.encoderblock if tower == "img" else model.llm.layers
    graphdef, state = nnx.split(stacked)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


def _unit(model, unit: str, x, ctx: dict[str, Any]):
    """(the unit's output, {forward point: array}) of one unit of points.train_units on x, as the training
    forward of train.py computes it; the head's output is the loss (its points: the logits, the losses)."""
    if unit == pts.STEM:
        e = model.img.embedding(ctx["image"].astype(model.img.pos_embedding[...].dtype))
        y = e + model.img.pos_embedding[...]
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
        logp = jax.nn.log_softmax(text_logits, axis=-1)
        nll = -jnp.take_along_axis(logp, ctx["targets"][..., None], axis=-1)[..., 0]
        w = ctx["weights"].astype(nll.dtype)
        loss, example = training.normalize((nll * w).sum(1), w.sum(1), model.conventions.loss_normalization)
        return loss, {pts.LOGITS: logits, pts.TRAIN_LOSS: loss, pts.TRAIN_EXAMPLE_LOSS: example}
    if unit == pts.LLM_INPUT and "text_embedding" in ctx:  # train._loss: [image ; float16 text], then float32
        y = jnp.concatenate([x, ctx["text_embedding"]], axis=1).astype(ctx["image"].dtype)
        return y, {unit: y}
    y = model.unit(unit, x, ctx["text"])
    return y, {unit: y}


def _owned(model, unit: str, leaves: dict[str, Any]) -> list[tuple[str, str, int | None]]:
    """(gradient point, key, layer or None) of every trainable parameter of `unit`."""
    layers = {e.key: e.layers for e in spec.entries(model.config)}
    owned = []
    for key in leaves:
        if layers[key] is not None and unit.startswith(("img/block", "llm/layer")):
            i = int(unit[-2:])
            if unit in pts.leaf_unit(key, i):
                owned.append((pts.grad_leaf(key, i), key, i))
        elif layers[key] is None and unit in pts.leaf_unit(key):
            owned.append((pts.grad_leaf(key), key, None))
    return owned


def _canonical(model, grads) -> dict[str, np.ndarray]:
    """{key: numpy in canonical layout}, float32 (float64 for a float64 model), in spec order."""
    flat = _flat(nnx.to_pure_dict(grads))
    return {
        e.key: np.asarray(jax.device_get(flat[e.key])).astype(np.promote_types(flat[e.key].dtype, np.float32))
        for e in spec.entries(model.config)
        if e.key in flat
    }


def _leaf_points(model, grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """grad/<leaf> for every trainable leaf, and grad/<leaf>/layerNN for each layer of a stacked one."""
    layers = {e.key: e.layers for e in spec.entries(model.config)}
    out = {}
    for key, g in grads.items():
        out[pts.grad_leaf(key)] = g
        out.update({pts.grad_leaf(key, i): g[i] for i in range(layers[key] or 0)})
    return out


def _input(model, x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float64 if model.dtype == "float64" else np.float32)


# -- jitted steps (the jax side alone: torch's autograd needs no compiled function) ---------------------------------
def _probes(model, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """A zero array for every unit input's gradient point, in the model dtype."""
    cfg = model.config
    b, s = batch["text"].shape[0], cfg.num_image_tokens + batch["text"].shape[1]
    dtype = model.module.llm.final_norm.scale[...].dtype
    shapes = {pts.GRAD_PROJECTOR: (b, cfg.num_image_tokens, cfg.text.width)}
    probes = {}
    for _, _, grad_in, _ in pts.train_units(cfg):
        if grad_in is None:
            continue
        shape = shapes.get(grad_in) or (
            (b, cfg.num_image_tokens, cfg.vision.width) if grad_in.startswith("grad/img/") else (b, s, cfg.text.width)
        )
        probes[grad_in] = model.put(np.zeros(shape, dtype))
    return probes


@functools.partial(jax.jit, static_argnums=0)
def _points(graphdef, leaves, frozen, batch, probes):
    """(forward points and losses, (gradient of the trainable state, gradient of each probe))."""

    def loss(t, p):
        model = nnx.merge(graphdef, t, frozen)
        ctx, x, out = _context(model, batch), None, {}
        for unit, _, grad_in, _ in pts.train_units(model.config):
            if grad_in is not None:
                x = x + p[grad_in]
            x, aux = _unit(model, unit, x, ctx)
            out.update(aux)
        return x, {k: v.astype(jnp.promote_types(v.dtype, jnp.float32)) for k, v in out.items()}

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(leaves, probes)
    return out, grads


@functools.partial(jax.jit, static_argnums=0)
def _vjps(graphdef, leaves, frozen, xs, ups, batch):
    """Per unit: (its forward points, the gradient of the trainable state, of its input x) for cotangent ups[unit]
    (1 for the loss), every unit on its own given input."""
    config = nnx.merge(graphdef, leaves, frozen).config
    aux_of, grads_of, gx_of = {}, {}, {}
    for unit, _, _, _ in pts.train_units(config):

        def run(t, x, unit=unit):
            model = nnx.merge(graphdef, t, frozen)
            y, aux = _unit(model, unit, x, _context(model, batch))
            return y, {k: v.astype(jnp.promote_types(v.dtype, jnp.float32)) for k, v in aux.items()}

        y, pull, aux_of[unit] = jax.vjp(run, leaves, xs.get(unit), has_aux=True)
        grads_of[unit], gx_of[unit] = pull(ups[unit] if unit in ups else jnp.ones_like(y))
    return aux_of, grads_of, gx_of


# -- the block-streamed step (parity/stream_train.py drives these on a streamed skeleton, jax_impl/stream.py) -------
def stream_context(model, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """`_context` of the shifted training batch on a streamed skeleton's device (its parameters are abstract)."""
    from parity.jax_impl import stream

    checked = validate_inputs({k: v for k, v in inputs.items() if k != "mask_loss"}, model.config, "inputs")
    shifted = training.shift({**checked, "mask_loss": inputs["mask_loss"]})
    batch = {k: stream._ints(model, v) for k, v in shifted.items() if k != "image"}
    batch["image"] = stream._input(model, shifted["image"])
    module, conv = model.module, model.module.conventions  # abstract: `_context`'s lines, the dtype the model's
    _, _, positions, masks = module.full_masks(
        batch["mask_ar"], jnp.ones_like(batch["text"]), causal=conv.train_prefix == "causal"
    )
    return {**batch, "masks": masks, "angles": module.llm.angles(positions, jnp.dtype(model.dtype))}


def stream_unit(model, weights: dict[str, np.ndarray], unit: str, x, ctx: dict[str, Any], cot=None, train=()):
    """Unit `unit` of points.train_units (not the head) on x with `weights` placed (the LLM input: the rows of
    ctx["text"]'s tokens, indexed by `local` in ctx): its output; given `cot` (d loss / d output), its VJP instead:
    (d loss / d x or None, {key in `train`: its gradient}), recomputing the unit's forward (float32 numpy)."""
    from parity.jax_impl import stream

    ctx = {k: v for k, v in ctx.items() if k != "local"} | (
        {"text": stream._ints(model, ctx["local"])} if unit == pts.LLM_INPUT else {}
    )
    kind = _stream_kind(model, unit)
    trained = tuple(sorted(k for k in weights if k in train))
    xt = None if x is None else stream._input(model, x)
    with stream._placed(model, weights) as placed, matmul_precision(model.precision):
        if cot is None:
            return np.asarray(jax.device_get(_stream_forward(*placed, kind, xt, ctx)))
        dx, grads = _stream_vjp(*placed, kind, trained, xt, ctx, stream._input(model, cot))
        dx = None if dx is None else np.asarray(jax.device_get(dx))
        flat = {k: np.asarray(jax.device_get(v)) for k, v in _flat(nnx.to_pure_dict(grads)).items()}
    return dx, {k: flat[k][0] if k in model.stream_stacked else flat[k] for k in trained}


def stream_head(model, weights: dict[str, np.ndarray], x: np.ndarray, cot=None, train: bool = False):
    """The training logits of a chunk of the embedding table's rows (`weights`) on the final-normed text positions
    x; given `cot` (d loss / d those logits), (d loss / d x, the chunk's gradient or None unless `train`)."""
    from parity.jax_impl import stream

    kind = "head:capped" if model.module.conventions.final_softcap == "always" else "head:plain"
    trained = (EMBED,) if train else ()
    with stream._placed(model, weights) as placed, matmul_precision(model.precision):
        if cot is None:
            return np.asarray(jax.device_get(_stream_forward(*placed, kind, stream._input(model, x), {})))
        dx, grads = _stream_vjp(*placed, kind, trained, stream._input(model, x), {}, stream._input(model, cot))
        dx = np.asarray(jax.device_get(dx))
        return dx, np.asarray(jax.device_get(_flat(nnx.to_pure_dict(grads))[EMBED])) if train else None


def stream_loss(model, logits: np.ndarray, ctx: dict[str, Any]) -> tuple[float, np.ndarray, np.ndarray]:
    """(loss, per-row losses, d loss / d logits) of the text logits, as `_unit`'s head forms the loss."""
    from parity.jax_impl import stream

    conv = model.module.conventions
    (loss, example), g = _stream_loss(
        conv.loss_normalization, stream._input(model, logits), ctx["targets"], ctx["weights"]
    )
    return float(loss), np.asarray(jax.device_get(example)), np.asarray(jax.device_get(g))


# -- the streamed step's jitted bodies (the jax side alone) ------------------------------------------------------------
def _stream_kind(model, unit: str) -> str:
    """The compiled body a unit runs: one per kind of block (the ViT's; the LLM's local or global), else the unit
    (the head: "head:capped" or "head:plain")."""
    if unit.startswith("img/block"):
        return "block:img"
    if unit.startswith("llm/layer"):
        return "block:local" if model.config.text.is_local_layer(int(unit[-2:])) else "block:global"
    return unit


def _stream_run(model, kind: str, x, ctx):
    """The unit `kind` of a placed model (stacked leaves: a stack of one layer) on x."""
    if kind == "block:img":
        return _block(model, "img", 0)(x)[0]
    if kind in ("head:capped", "head:plain"):
        return model.llm.logits(x, capped=kind == "head:capped")
    if kind in ("block:local", "block:global"):
        mask = block_mask(ctx["masks"], kind == "block:local")
        return _block(model, "llm", 0)(x, ctx["angles"], mask, attn_softcap=model.attn_softcap)[0]
    return _unit(model, kind, x, ctx)[0]


@functools.partial(jax.jit, static_argnums=(0, 2))
def _stream_forward(graphdef, state, kind, x, ctx):
    return _stream_run(nnx.merge(graphdef, state), kind, x, ctx)


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _stream_vjp(graphdef, state, kind, trained, x, ctx, cot):
    """(d loss / d x or None, d loss / d the trained state) of the unit for cotangent `cot`."""
    wanted = set(trained)
    gd, t, frozen = nnx.split(nnx.merge(graphdef, state), lambda path, _: "/".join(map(str, path)) in wanted, ...)
    run = lambda t, x: _stream_run(nnx.merge(gd, t, frozen), kind, x, ctx)
    if x is None:
        _, pull = jax.vjp(lambda t: run(t, None), t)
        return None, pull(cot)[0]
    _, pull = jax.vjp(run, t, x)
    gt, gx = pull(cot)
    return gx, gt


@functools.partial(jax.jit, static_argnums=0)
def _stream_loss(normalization, logits, targets, weights):
    def loss(logits):
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        w = weights.astype(nll.dtype)
        return training.normalize((nll * w).sum(1), w.sum(1), normalization)

    (value, example), pull = jax.vjp(loss, logits)
    return (value, example), pull((jnp.ones_like(value), jnp.zeros_like(example)))[0]
