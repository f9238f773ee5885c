"""`compare --train-step`: one fine-tuning step compared point by point, forward and backward.

Both sides run the training step of parity.training (TrainOptions) on the same checkpoint and training inputs, one
after the other in this process, through their backend's `train_points` (backend.TrainPointsBackend): the training
forward's capture points, the loss, the gradient at every unit input from the head down, every trainable leaf's
gradient (and each layer's of a stacked leaf), and with --steps N the later losses and the leaves after the last
step (points.train_points gives the order; first_divergence follows it: forward, loss, backward). With
--teacher-forced, side B's `unit_vjps` (backend.BackwardBackend) runs every unit on side A's input to it and with
side A's gradient of its output: its `local` result on the unit's forward points, its input-gradient point and its
parameter gradients, so a unit that computes its backward differently fails locally alone.

The comparison is core.Comparison (the same JSON schema, profiles, policies, report, HTML, --save / --rejudge) with
the gradient bounds below in front of the profile's rules. Points on the shifted sequence ([B, S - 1, ...]) compare
the positions that can reach the loss: the image and every text position whose next token is real (not padding).
A leaf whose true gradient is exactly zero (the ViT attention key bias: a constant added to every logit leaves the
softmax unchanged) holds rounding noise only: a gradient point whose side-A scale is below NEAR_ZERO of the global
gradient scale is judged against the global scale (its max_rel is max |B - A| / the largest |A| of any leaf), and
a note names it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from parity import backend as backends
from parity import points as pts
from parity import spec
from parity.compare import tolerances as tol
from parity.compare.core import COMPARED, Comparison, PointRecord, curve_row, judge, load, point_record, resolve_sides
from parity.compare.manifests import check_manifests, manifest_differences
from parity.compare.stats import point_stats
from parity.conventions import TRAIN_FIELDS
from parity.errors import ConfigError, InputsError
from parity.training import TrainOptions, trainable_leaves

NEAR_ZERO = 1e-6  # a leaf's max |g| below this fraction of the global gradient scale: an exactly-zero gradient
# Training-step bounds (max_rel) per profile. fp32 is calibrated from benchmarks/results/train_step_calibration.json
# (benchmarks/train_step_calibration.py: torch vs jax vs torch float64 vs transformers, every leaf trainable, on the
# four tiny configs with random weights and with the golden checkpoints, under both presets): about 4x the largest
# figure measured, rounded up to a 1-2-5 step. Largest measured: loss 2.2e-7 (-> 1e-6); activation gradients 7.5e-6,
# parameter gradients 2.0e-5, both jax vs torch on golden/tiny-pg1-mqa.npz (-> 1e-4, which also bounds gradient
# norms, whose relative error follows the leaf's); parameters after N steps (w - lr g: lr x a gradient error, small
# against |w|) keep 1e-5. fp64 keeps the forward fp64 bound. tf32, f16 and bf16 (no float32 step measured there) take
# their forward profile's bounds: the logits bound for the loss and the parameters, the branches bound for gradients.
_TRAIN_GROUPS = {"norms": ["train/grad_norm/*"], "loss": ["train/*"], "grads": ["grad/*"], "params": ["param/*"]}
_TRAIN_BOUNDS = {
    "fp64": {"norms": 1e-10, "loss": 1e-10, "grads": 1e-10, "params": 1e-10},
    "fp32": {"norms": 1e-4, "loss": 1e-6, "grads": 1e-4, "params": 1e-5},
    **{
        p: {"norms": b["branches"], "loss": b["logits"], "grads": b["branches"], "params": b["logits"]}
        for p, b in tol._BOUNDS.items()
        if p in ("tf32", "f16", "bf16")
    },
}
TRAIN_RULES = {
    name: tuple(tol._rule(_TRAIN_GROUPS[g], f"profile {name} (training step)", max_rel=v) for g, v in groups.items())
    for name, groups in _TRAIN_BOUNDS.items()
}


@dataclasses.dataclass(frozen=True)
class TrainComparison(Comparison):
    """A Comparison of a training step: its options in `train`, and backward curves in `amplification()`."""

    train: dict[str, Any] = dataclasses.field(default_factory=dict)

    def amplification(self) -> dict[str, list[dict[str, Any]]]:
        """The forward towers (Comparison's), then per tower the gradient at each block's input, from the top
        block down, with its ratio to the gradient above it (> 1 where the backward amplifies error)."""
        amp = super().amplification()
        by = {r.point: r for r in self.records}
        for tower, top, name in (
            ("llm_backward", pts.GRAD_FINAL_NORM_IN, pts.grad_llm_block_in),
            ("img_backward", pts.GRAD_IMG_FINAL_NORM_IN, pts.grad_img_block_in),
        ):
            rows, prev = [], by.get(top)
            pattern = re.compile(re.escape(name(0)).replace("00", r"(\d+)"))
            blocks = sorted((int(m.group(1)) for p in by if (m := pattern.fullmatch(p))), reverse=True)
            for i in blocks:
                r = by[name(i)]
                rows.append(curve_row(i, r, prev))
                prev = r
            amp[tower] = rows
        return amp

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "train_step": self.train}


def compare_train_step(
    a: str | None = None,
    b: str | None = None,
    ckpt: str | None = None,
    against: str | None = None,
    inputs: str | None = None,
    impl: str = "torch",
    convention: str | None = None,
    config: str | None = None,
    options: TrainOptions = TrainOptions(),  # noqa: B008 (frozen, immutable)
    teacher_forced: bool = False,
    points: str | list[str] | None = None,
    profile: str | None = None,
    policy: str | None = None,
    allow_convention_mismatch: bool = False,
    progress: Callable[[str], None] | None = None,
) -> TrainComparison:
    """Run one training step on both sides and compare it point by point (see the module docstring)."""
    from parity.compare.sides import _job
    from parity.inputs import load_inputs
    from parity.pipeline import load

    side_a, side_b = resolve_sides(a, b, ckpt, against, impl)
    for s in (side_a, side_b):
        if not s.runs:
            raise InputsError(
                f"--train-step: side {s.label} {s.spec} is a capture file; a training step runs a model "
                "(IMPL[:DEVICE][:DTYPE][:PRECISION] on CKPT)"
            )
        if not backends.train_points(s.impl):
            raise ConfigError(f"--train-step: implementation {s.impl!r} has no train_points (TrainPointsBackend)")
    if teacher_forced and not backends.teacher_forced_backward(side_b.impl):
        raise ConfigError(
            f"--train-step --teacher-forced runs side B's units' VJPs: implementation {side_b.impl!r} has no "
            "unit_vjps (BackwardBackend: torch, jax)"
        )
    if inputs is None:
        raise ConfigError("--train-step: --inputs is required (training inputs with mask_loss: parity inputs --suffix)")
    options.check()
    if "mask_loss" not in load_inputs(inputs, validate=False):
        raise InputsError(
            f"{inputs}: no 'mask_loss' (the tokens to learn): not a training batch; make one with "
            "`parity inputs --suffix` (or `parity inputs --jsonl`)"
        )
    if convention is None:
        convention = "transformers" if "transformers" in (side_a.impl, side_b.impl) else "big_vision"
    say = progress or (lambda msg: None)
    leaves: list[str] = []

    def check(cfg) -> None:
        leaves[:] = trainable_leaves(options, [e.key for e in spec.entries(cfg)])

    runs: dict[str, tuple[dict, dict, dict | None]] = {}
    for side in (side_a, side_b):
        say(f"side {side.label}: {side.describe()}")
        loaded = load(_job(side, inputs, convention, config), None, None, check)
        if side is side_b:
            _check_sides(runs["A"][1], loaded.manifest, allow_convention_mismatch)
        local = None
        if side is side_b and teacher_forced:
            say("side B: every unit's VJP on side A's points")
            local = loaded.backend.unit_vjps(loaded.model, loaded.inputs, options, runs["A"][0])
        say(f"side {side.label}: training step")
        got = loaded.backend.train_points(loaded.model, loaded.inputs, options)
        manifest = {**loaded.manifest, "train": {**options.to_dict(), "trainable_leaves": list(leaves)}}
        runs[side.label] = (got, manifest, local)
        cfg, batch = loaded.config, loaded.inputs
        del loaded
    say("comparing")
    (pa, ma, _), (pb, mb, local) = runs["A"], runs["B"]
    stacked = {e.key: e.layers for e in spec.entries(cfg)}
    order = pts.train_points(cfg, leaves, stacked, options.steps)
    order = pts.select(order, points) if points else order
    local = _local_points(local, stacked) if local else None
    sides = {"A": side_a, "B": side_b}
    return _compare(pa, pb, local, order, ma, mb, cfg, batch, sides, profile, policy, options, leaves)


def _check_sides(ma: dict, mb: dict, allow: bool) -> None:
    """Side B against side A as the forward compare checks them (inputs, model, forward conventions), and the
    training conventions too (conventions.TRAIN_FIELDS)."""
    check_manifests(ma, mb, allow)
    ca, cb = ({k: m.get("conventions", {}).get(k) for k in TRAIN_FIELDS} for m in (ma, mb))
    if ca != cb and not allow:
        diff = ", ".join(f"{k}: {ca[k]} vs {cb[k]}" for k in TRAIN_FIELDS if ca[k] != cb[k])
        raise ConfigError(f"the two sides train under different conventions ({diff}); pass --allow-convention-mismatch")


def _local_points(local: dict[str, dict[str, np.ndarray]], stacked: dict[str, int | None]) -> dict[str, np.ndarray]:
    """Side B's teacher-forced values by point: each unit's points; a whole leaf's gradient the sum of its units'
    shares (the tied embedding: the lookup and the head), a stacked leaf's its layers stacked."""
    out: dict[str, np.ndarray] = {}
    for unit_points in local.values():
        for k, v in unit_points.items():
            out[k] = out[k] + v if k in out and k.startswith("grad/") and k.count("/layer") == 0 else v
    for key, layers in stacked.items():
        per_layer = [out.get(pts.grad_leaf(key, i)) for i in range(layers or 0)]
        if layers and all(g is not None for g in per_layer):
            out[pts.grad_leaf(key)] = np.stack(per_layer)
    return out


def _valid(cfg, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(bool[B, S - 1] of the shifted sequence's positions that reach the loss: the image and every text position
    whose next token is real; the text positions among them, for the logits' distribution statistics)."""
    mask_input = np.asarray(inputs.get("mask_input", np.ones_like(inputs["text"])), bool)
    b, t = mask_input.shape[0], cfg.num_image_tokens
    valid = np.concatenate([np.ones((b, t), bool), mask_input[:, 1:]], axis=1)
    text = valid.copy()
    text[:, :t] = False
    return valid, text


def _compare(pa, pb, local, order, ma, mb, cfg, inputs, sides, profile, policy, options, leaves) -> TrainComparison:
    valid, text = _valid(cfg, inputs)
    ulp_dtype = tol.compared_dtype(ma, mb)
    scale = max((float(np.abs(v).max()) for k, v in pa.items() if _is_leaf_grad(k, leaves) and v.size), default=0.0)
    records, notes = [], []
    for name in order:
        ra = (lambda name=name: np.asarray(pa[name])) if name in pa else None
        rb = (lambda name=name: np.asarray(pb[name])) if name in pb else None
        r, a = point_record(name, ra, rb, ulp_dtype, valid, name == pts.LOGITS, text)
        if r is None:
            continue
        if r.status == COMPARED and local is not None and name in local:
            ls = point_stats(a, np.asarray(local[name]), ulp_dtype, valid, name == pts.LOGITS, text)
            r = dataclasses.replace(r, local=ls)
        if r.status == COMPARED and _is_leaf_grad(name, leaves) and r.stats.max_abs is not None:
            own = float(np.abs(a).max()) if a.size else 0.0
            if scale > 0 and own < NEAR_ZERO * scale:
                r = _against(r, scale)
                notes.append(
                    f"{name}: max |A| {own:.2g} < {NEAR_ZERO:g} of the global gradient scale {scale:.3g} (an "
                    "exactly-zero true gradient): judged as max |B - A| / the global scale"
                )
        records.append(r)
    tols = train_tolerances(profile, policy, ma, mb)
    sides_d = {k: {"spec": sides[k].spec, "kind": "run", "manifest": m} for k, m in (("A", ma), ("B", mb))}
    valid_what = "positions that reach the loss (the image; text positions whose next token is real)"
    c = TrainComparison(
        sides_d,
        manifest_differences(ma, mb),
        tols,
        tuple(records),
        ulp_dtype,
        local is not None,
        valid_what,
        tuple(notes),
        train={**options.to_dict(), "trainable_leaves": list(leaves), "global_gradient_scale": scale},
    )
    return judge(c, tols)


def _is_leaf_grad(point: str, leaves: list[str]) -> bool:
    return point.startswith("grad/") and any(
        point == f"grad/{k}" or point.startswith(f"grad/{k}/layer") for k in leaves
    )


def _against(r: PointRecord, scale: float) -> PointRecord:
    """The record with max_rel (its own and its local's) taken against the global gradient scale."""
    fix = lambda s: None if s is None else dataclasses.replace(s, max_rel=s.max_abs / scale)
    return dataclasses.replace(r, stats=fix(r.stats), local=fix(r.local))


def train_tolerances(profile: str | None, policy: str | None, ma: dict, mb: dict) -> tol.Tolerances:
    """The forward compare's tolerances with the training-step bounds after the policy's rules, before the
    profile's."""
    t = tol.tolerances(profile, policy, ma, mb)
    n = len(t.rules) - len(tol.PROFILES[t.profile])
    return dataclasses.replace(t, rules=t.rules[:n] + TRAIN_RULES[t.profile] + t.rules[n:])


def rejudge(path: str, profile: str | None = None, policy: str | None = None) -> TrainComparison:
    """A saved training-step comparison judged again under `profile` / `policy`."""
    with open(path) as f:
        train = json.load(f).get("train_step", {})
    c = load(path)
    t = TrainComparison(*(getattr(c, f.name) for f in dataclasses.fields(Comparison)), train=train)
    return judge(t, train_tolerances(profile, policy, c.sides["A"]["manifest"], c.sides["B"]["manifest"]))


def is_train_step(path: str) -> bool:
    """Whether a saved comparison (--save) is a training step's."""
    try:
        with open(path) as f:
            return "train_step" in json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
