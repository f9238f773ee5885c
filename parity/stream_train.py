"""The block-streamed training step (issue 24 §1): `parity train-step --stream` for a model that does not fit
resident, holding about one unit's weights at a time plus the trainable leaves (resident, updated) and their
gradients.

Each step runs the training forward unit by unit (points.train_units, as parity/torch_impl/backward.py and
jax_impl/backward.py run it), keeping only each unit's input activation ([B, S, D]); the head in row chunks of the
embedding table (as the streamed capture does) gives the text logits, whose loss and gradient are formed whole;
then the head's chunks again (d loss / d final norm, and the tied table's rows when it trains) and the units in
reverse, each re-read and its VJP computed on its stored input and the upstream gradient (recompute: checkpointing
at unit boundaries), keeping the gradient of trainable leaves only; the reverse pass stops below the lowest unit
owning a trainable leaf. Frozen leaves are always read from the checkpoint; the trainable ones are read once and
then held, SGD updating them (w - lr * g in float32, as the resident step). The tied embedding's gradient is its
head part plus its lookup part (the rows of the tokens present).

The per-unit work is the implementation's (`stream_context`, `stream_unit`, `stream_head`, `stream_loss` at the end
of torch_impl/backward.py and jax_impl/backward.py, mirrored); the result is parity.training.TrainResult, so
parity.train_run writes --grads, -o and the per-step records exactly as it does for the resident step.
"""

from __future__ import annotations

import importlib

import numpy as np

from parity import monitor, spec, training
from parity import points as pts
from parity.errors import ConfigError
from parity.stream import EMBED, LLM, PATCH, UNIT_KEYS, VIT, StreamModel, pipelined
from parity.training import StepRecord, TrainOptions, TrainResult


def check(options: TrainOptions) -> None:
    """The options a streamed step runs (float32 only): ConfigError (one line) otherwise."""
    options.check()
    for flag, value in (("--frozen-dtype", options.frozen_dtype), ("--vit-matmul-dtype", options.vit_matmul_dtype)):
        if value != "float32":
            raise ConfigError(f"train-step --stream {flag} {value}: a streamed training step runs float32 only")


def _impl(m: StreamModel):
    """The implementation's backward module (the one beside its stream hook)."""
    return importlib.import_module(m.hook.__name__.rsplit(".", 1)[0] + ".backward")


def _keys(m: StreamModel, unit: str) -> tuple[list[str], int | None]:
    """(the unit's canonical keys, its layer for a block) of a unit of points.train_units other than the head."""
    if unit.startswith(("img/block", "llm/layer")):
        prefix = VIT if unit.startswith("img/") else LLM
        return [k for k in m.source.entries if k.startswith(prefix)], int(unit[-2:])
    if unit == pts.STEM:
        return list(PATCH), None
    if unit == pts.LLM_INPUT:
        return [EMBED], None
    return list(UNIT_KEYS[unit]), None


def _reader(m: StreamModel, unit: str, params: dict[str, np.ndarray], ids: np.ndarray):
    """A thunk reading `unit`'s weights: frozen ones from the checkpoint, trainable ones from `params` (copied: a
    placed unit may alias or release what it is given)."""
    keys, layer = _keys(m, unit)

    def read() -> dict[str, np.ndarray]:
        frozen = [k for k in keys if k not in params]
        if unit == pts.LLM_INPUT:
            w = m.source.take(ids) if frozen else {}
        else:
            w = m.source.read(frozen, layer) if frozen else {}
        for k in keys:
            if k in params:
                w[k] = (
                    params[k][ids] if unit == pts.LLM_INPUT else params[k][layer if layer is not None else ...].copy()
                )
        return w

    return read


def _rows(m: StreamModel, params: dict[str, np.ndarray], a: int, b: int):
    if EMBED in params:
        return lambda: {EMBED: params[EMBED][a:b].copy()}
    return lambda: m.source.rows(a, b)


def _norms(arrays: dict[str, np.ndarray]) -> dict[str, float]:
    """{key: L2 norm}, accumulated in float64 (a stacked leaf layer by layer, as the resident steps)."""
    out = {}
    for k, v in arrays.items():
        parts = v if v.ndim and k.startswith((VIT, LLM)) else [v]
        out[k] = float(np.sqrt(sum(np.sum(np.square(p, dtype=np.float64)) for p in parts)))
    return out


def _grads(m: StreamModel, b, ctx, units, params: dict[str, np.ndarray], ids: np.ndarray):
    """(loss, per-row losses, {trainable key: d loss / d it}) of one step at the weights `params` hold."""
    cfg, model = m.config, m.model
    layers = {e.key: e.layers for e in spec.entries(cfg)}
    body = units[:-1]  # the head with the loss runs in chunks
    inputs: dict[str, np.ndarray | None] = {}
    box: dict[str, np.ndarray | None] = {"x": None}

    def fwd(w, unit):
        inputs[unit] = box["x"]
        box["x"] = b.stream_unit(model, w, unit, box["x"], ctx)

    tick = lambda u: "block" if "/block" in u or "/layer" in u else None
    pipelined([(_reader(m, u, params, ids), lambda w, u=u: fwd(w, u), tick(u)) for u, *_ in body])
    final, t = box["x"], cfg.num_image_tokens
    xt = np.ascontiguousarray(final[:, t:])
    chunks: list[np.ndarray] = []
    spans = m.spans()
    pipelined([(_rows(m, params, a, c), lambda w: chunks.append(b.stream_head(model, w, xt)), None) for a, c in spans])
    loss, example, box["dlogits"] = b.stream_loss(model, np.concatenate(chunks, axis=-1), ctx)
    chunks.clear()
    grads: dict[str, np.ndarray] = {k: np.zeros_like(v) for k, v in params.items()}
    train_table = EMBED in params
    dxt = np.zeros_like(xt)

    def head(w, a, c):
        dx, dtable = b.stream_head(model, w, xt, np.ascontiguousarray(box["dlogits"][..., a:c]), train_table)
        dxt[...] = dxt + dx
        if train_table:
            grads[EMBED][a:c] = dtable

    pipelined([(_rows(m, params, a, c), lambda w, a=a, c=c: head(w, a, c), None) for a, c in spans])
    del box["dlogits"]
    cot = np.zeros_like(final)
    cot[:, t:] = dxt
    box["cot"] = cot
    owning = [u for u, *_ in body if any(k in params for k in _keys(m, u)[0])]
    lowest = min(i for i, (u, *_) in enumerate(body) if u in owning) if owning else len(body)

    def bwd(w, unit):
        keys, layer = _keys(m, unit)
        dx, g = b.stream_unit(model, w, unit, inputs[unit], ctx, box["cot"], set(params))
        box["cot"] = dx
        for k, v in g.items():
            if k == EMBED:
                np.add.at(grads[k], ids, v)  # ids are unique: each row's lookup gradient added once
            elif layers[k] is not None:
                grads[k][layer] = v
            else:
                grads[k] = v

    steps = [(_reader(m, u, params, ids), lambda w, u=u: bwd(w, u), tick(u)) for u, *_ in reversed(body[lowest:])]
    pipelined(steps)
    return loss, example, grads


def train_step(m: StreamModel, inputs: dict[str, np.ndarray], options: TrainOptions) -> TrainResult:
    """`options.steps` SGD steps on one batch, block-streamed: the resident train_step's result (TrainResult in
    canonical keys and layout), holding one unit's weights at a time plus the trainable leaves."""
    check(options)
    if np.dtype(m.source.compute or np.float32) != np.float32:
        raise ConfigError("train-step --stream: a streamed training step runs float32 only (--compute-dtype float32)")
    b = _impl(m)
    cfg = m.config
    names = training.trainable_leaves(options, [e.key for e in spec.entries(cfg)])
    params = {k: np.array(v, np.float32) for k, v in m.source.read(names).items()}
    params = {k: params[k] for k in names}
    ctx = b.stream_context(m.model, inputs)
    text = np.asarray(ctx["text"])
    ids, local = np.unique(text, return_inverse=True)
    ctx["local"] = local.reshape(text.shape)
    units = pts.train_units(cfg)
    records, first = [], {}
    lr = np.float32(options.lr)
    for step in range(1, options.steps + 1):
        weight_norm = _norms(params)
        loss, example, grads = _grads(m, b, ctx, units, params, ids)
        grad_norm = _norms(grads)
        if step == 1:
            first = grads  # never written to again: each step makes its own
        records.append(
            StepRecord(
                step=step,
                loss=loss,
                example_loss=[float(v) for v in example],
                grad_norm=float(np.sqrt(sum(v * v for v in grad_norm.values()))),
                leaf_grad_norm=grad_norm,
                leaf_weight_norm=weight_norm,
            )
        )
        params = {k: v - lr * grads[k] for k, v in params.items()}
        monitor.tick("step")
    m.source.check()
    return TrainResult(records, first, params, training.empty_rows(np.asarray(ctx["weights"])))
