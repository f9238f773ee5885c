"""`compare`: run (or open) two sides, check they saw the same inputs under the same convention, then compare
every capture point in forward order, one point in memory at a time; `rejudge`: the same judgement on a saved
comparison under another profile or policy, without running anything.

Side A is the reference: relative statistics are relative to A, and teacher-forced units of B run on A's inputs.
The verdict (pass / fail, in words) is verdict.py's: on the units' local errors when teacher-forced, else on every
point's propagated error.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from parity import points as pts
from parity.compare import tolerances as tol
from parity.compare.manifests import check_manifests, manifest_differences, valid_mask
from parity.compare.sides import Capture, Side, job, parse_side, run_side, supports_teacher_forcing
from parity.compare.stats import PointStats, point_stats
from parity.compare.truth import TruthPoint, overall, truth_side
from parity.compare.verdict import Verdict, decide
from parity.config import PaliGemmaConfig
from parity.errors import ConfigError, InputsError, describe

SCHEMA = "parity.compare/1"
COMPARED, MISSING_A, MISSING_B = "compared", "not captured in A", "not captured in B"


@dataclasses.dataclass(frozen=True)
class PointRecord:
    point: str
    status: str  # COMPARED or "not captured in A/B"
    stats: PointStats | None = None
    judgement: tol.Judgement | None = None
    local: PointStats | None = None  # teacher-forced: B's block on A's input, against A
    local_judgement: tol.Judgement | None = None
    truth: TruthPoint | None = None  # --truth: A's and B's distance to a float64 run of A's implementation

    @property
    def passed(self) -> bool:
        return (self.judgement is None or bool(self.judgement)) and (
            self.local_judgement is None or bool(self.local_judgement)
        )

    def to_dict(self) -> dict[str, Any]:
        d = {
            "point": self.point,
            "status": self.status,
            "stats": self.stats.to_dict() if self.stats else None,
            "judgement": self.judgement.to_dict() if self.judgement is not None else None,
            "local": None,
        }
        if self.local is not None:
            d["local"] = {"stats": self.local.to_dict(), "judgement": self.local_judgement.to_dict()}
        if self.truth is not None:
            d["truth"] = _finite(self.truth.to_dict())
        return d


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Truthy when the verdict passes (verdict.py): with teacher forcing, every unit's local error; else (or when
    the policy requires propagated agreement) every compared point."""

    sides: dict[str, dict[str, Any]]  # label -> {"spec", "kind", "manifest"}
    differences: list[dict[str, Any]]  # manifest fields that differ
    tolerances: tol.Tolerances
    records: tuple[PointRecord, ...]
    ulp_dtype: str
    teacher_forced: bool
    valid_positions: str
    notes: tuple[str, ...] = ()
    truth_spec: str | None = None  # --truth: the float64 side

    def truth_summary(self) -> dict[str, Any] | None:
        """--truth over every point: each side's largest distance to float64 and which side drifts."""
        return overall(self.records)

    def __bool__(self) -> bool:
        return self.verdict().passed

    def verdict(self) -> Verdict:
        return decide(self.records, self.teacher_forced, self.tolerances.require_propagated, self.amplification())

    @property
    def exit_code(self) -> int:
        return 0 if self else 1

    @property
    def first_divergence(self) -> str | None:
        return next((r.point for r in self.records if r.judgement is not None and not r.judgement), None)

    @property
    def first_local_divergence(self) -> str | None:
        return next((r.point for r in self.records if r.local_judgement is not None and not r.local_judgement), None)

    def amplification(self) -> dict[str, list[dict[str, Any]]]:
        """Per tower, each block's residual-stream error (max_rel; local beside it when teacher-forced) and its
        ratio to the previous block's (to the tower's input for block 0): > 1 where a block amplifies error."""
        by = {r.point: r for r in self.records}
        towers = {"img": (pts.IMG_POS_EMBED, pts.img_block_out), "llm": (pts.LLM_INPUT, pts.llm_block_out)}
        out: dict[str, list[dict[str, Any]]] = {}
        for tower, (first, block_out) in towers.items():
            rows, prev, i = [], by.get(first), 0
            while (r := by.get(block_out(i))) is not None:
                rows.append(curve_row(i, r, prev))
                prev, i = r, i + 1
            out[tower] = rows
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "passed": bool(self),
            "first_divergence": self.first_divergence,
            "first_local_divergence": self.first_local_divergence,
            "teacher_forced": self.teacher_forced,
            "profile": self.tolerances.profile,
            "tolerances": self.tolerances.to_dict(),
            "ulp_dtype": self.ulp_dtype,
            "valid_positions": self.valid_positions,
            "sides": self.sides,
            "manifest_differences": self.differences,
            "notes": list(self.notes),
            "amplification": _finite(self.amplification()),
            "verdict": _finite(self.verdict().to_dict()),
            "points": [r.to_dict() for r in self.records],
            **({"truth": _finite({"side": self.truth_spec, **self.truth_summary()})} if self.truth_summary() else {}),
        }


def _finite(x):
    if isinstance(x, float) and not np.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


# -- the comparison -----------------------------------------------------------------------------------------------
def resolve_sides(a: str | None, b: str | None, ckpt: str | None, against: str | None, impl: str) -> tuple[Side, Side]:
    if against is not None:
        if ckpt is None:
            raise ConfigError("--against CKPT_B compares against CKPT: give CKPT too")
        return parse_side("A", a or impl, ckpt), parse_side("B", b or impl, against)
    if a is None or b is None:
        raise ConfigError("give both sides (--a and --b), or CKPT --against CKPT_B")
    return parse_side("A", a, ckpt), parse_side("B", b, ckpt)


def compare(
    a: str | None = None,
    b: str | None = None,
    ckpt: str | None = None,
    against: str | None = None,
    inputs: str | None = None,
    impl: str = "torch",
    convention: str | None = None,
    config: str | None = None,
    layer_by_layer: bool = False,
    teacher_forced: bool = False,
    points: str | list[str] | None = None,
    profile: str | None = None,
    policy: str | None = None,
    allow_convention_mismatch: bool = False,
    isolate: bool = True,
    progress: Callable[[str], None] | None = None,
    truth: bool = False,
    stream: bool | None = None,
) -> Comparison:
    """Compare side B against side A (see the module docstring). Sides: `IMPL[:DEVICE][:DTYPE][:PRECISION]` run on
    `ckpt` (B on `against` when given) with `inputs`, or capture files. Without `layer_by_layer` only logits."""
    side_a, side_b = resolve_sides(a, b, ckpt, against, impl)
    running = [s for s in (side_a, side_b) if s.runs]
    layer_by_layer = layer_by_layer or teacher_forced or not running  # two capture files: all their points
    if teacher_forced and not side_b.runs:
        raise ConfigError(
            "--teacher-forced runs side B's blocks on side A's inputs: side B must be an "
            "implementation, not a capture file"
        )
    if teacher_forced and not supports_teacher_forcing(side_b.impl):
        raise ConfigError(f"--teacher-forced: implementation {side_b.impl!r} has no vit_block/llm_block")
    side_t = truth_side(side_a) if truth else None
    if running and inputs is None:
        raise ConfigError("--inputs is required to run a side")
    inputs = os.path.abspath(inputs) if inputs else None
    if convention is None:
        convention = "transformers" if any(s.impl == "transformers" for s in running) else "big_vision"
    selection = (points or None) if layer_by_layer else [pts.LOGITS]
    say = progress or (lambda msg: None)
    with tempfile.TemporaryDirectory(prefix="parity-compare-") as tmp:

        def side_job(side: Side, a_path: str | None) -> dict[str, Any]:
            out = os.path.join(tmp, f"{side.label}.safetensors")
            return job(
                side, inputs, out, convention, config, selection, a_path if teacher_forced else None, stream=stream
            )

        paths = run_sides(side_a, side_b, side_job, lambda j: run_side(j, isolate), say, side_t)
        say("comparing")
        return compare_captures(
            paths["A"][0],
            paths["B"][0],
            paths["B"][1],
            {"A": side_a, "B": side_b},
            inputs=inputs,
            layer_by_layer=layer_by_layer,
            points=points,
            profile=profile,
            policy=policy,
            allow_convention_mismatch=allow_convention_mismatch,
            truth=paths["T"][0] if side_t else None,
            truth_spec=side_t.spec if side_t else None,
        )


def run_sides(
    side_a: Side,
    side_b: Side,
    side_job: Callable[[Side, str | None], dict[str, Any]],
    run: Callable[[dict[str, Any]], dict[str, Any]],
    say: Callable[[str], None],
    side_t: Side | None = None,
) -> dict[str, tuple[str, str | None]]:
    """label -> (capture, teacher capture or None) of both sides: a capture side as it is, a running side through
    `run(side_job(side, A's capture))` (B after A, so that B can be fed A's capture); then the --truth side "T"
    (a float64 run of A's implementation) through the same pipeline."""
    paths: dict[str, tuple[str, str | None]] = {}
    for side in (side_a, side_b, *([side_t] if side_t else [])):
        if not side.runs:
            paths[side.label] = (side.capture, None)
            continue
        say(f"side {side.label}: {side.describe()}")
        r = run(side_job(side, paths["A"][0] if side.label == "B" else None))
        paths[side.label] = (r["capture"], r["teacher"])
    return paths


def point_record(
    name: str, read_a, read_b, ulp_dtype: str, valid=None, logits=False, text=None
) -> tuple[PointRecord | None, np.ndarray | None]:
    """(the unjudged record of one point, A's array) from both sides' readers (zero-argument callables, None where a
    side lacks the point; nothing is read unless both have it). (None, None) when neither has it."""
    if read_a is None or read_b is None:
        if read_a is None and read_b is None:
            return None, None
        return PointRecord(name, MISSING_B if read_b is None else MISSING_A), None
    a = read_a()
    return PointRecord(name, COMPARED, _stats(name, a, read_b(), ulp_dtype, valid, logits, text)), a


def compare_captures(
    path_a: str,
    path_b: str,
    teacher: str | None = None,
    sides: dict[str, Side] | None = None,
    inputs: str | None = None,
    layer_by_layer: bool = True,
    points: str | list[str] | None = None,
    profile: str | None = None,
    policy: str | None = None,
    allow_convention_mismatch: bool = False,
    truth: str | None = None,
    truth_spec: str | None = None,
) -> Comparison:
    """Compare two capture files point by point (and B's teacher-forced unit outputs when given; with `truth`, a
    float64 capture, both sides against it)."""
    caps = {"A": Capture(path_a), "B": Capture(path_b)}
    local = Capture(teacher) if teacher else None
    ref = Capture(truth) if truth else None
    try:
        ma, mb = caps["A"].manifest, caps["B"].manifest
        check_manifests(ma, mb, allow_convention_mismatch)
        cfg = PaliGemmaConfig.from_dict(ma["config"])
        tols = tol.tolerances(profile, policy, ma, mb)
        ulp_dtype = tol.compared_dtype(ma, mb)
        valid, valid_what = valid_mask(cfg, ma, inputs)
        b_s = ma.get("inputs", {}).get("shapes", {}).get("text")  # [B, L]
        text = None
        if b_s:  # KL / top-k of the logits at the real text positions
            text = np.zeros((b_s[0], cfg.num_image_tokens + b_s[1]), bool)
            text[:, cfg.num_image_tokens :] = True
            text &= valid if valid is not None else True
        order = pts.forward_points(cfg) if layer_by_layer else [pts.LOGITS]
        order = pts.select(order, points) if points else order
        records = []
        for name in order:
            a, b = (functools.partial(caps[k].read, name) if name in caps[k].points else None for k in "AB")
            r, a = point_record(name, a, b, ulp_dtype, valid, name == pts.LOGITS, text)
            if r is None:
                continue
            if r.status == COMPARED and local is not None and name in local.points:
                ls = _stats(name, a, local.read(name), ulp_dtype, valid, name == pts.LOGITS, text)
                r = dataclasses.replace(r, local=ls)
            if r.status == COMPARED and ref is not None and name in ref.points:
                t = ref.read(name)
                ta = _stats(name, t, a, "float64", valid, False, None).max_rel
                tb = _stats(name, t, caps["B"].read(name), "float64", valid, False, None).max_rel
                r = dataclasses.replace(r, truth=TruthPoint(ta, tb))
            records.append(r)
        sides_d = {
            k: {
                "spec": sides[k].spec if sides else caps[k].path,
                "kind": "run" if sides and sides[k].runs else "capture",
                "manifest": caps[k].manifest,
            }
            for k in caps
        }
        return judge(
            Comparison(
                sides_d,
                manifest_differences(ma, mb),
                tols,
                tuple(records),
                ulp_dtype,
                local is not None,
                valid_what,
                _notes(ma, mb),
                truth_spec,
            ),
            tols,
        )
    finally:
        for c in (*caps.values(), local, ref):
            if c is not None:
                c.close()


def _stats(name, a, b, ulp_dtype, valid, logits, text) -> PointStats:
    if a.shape != b.shape:
        raise InputsError(f"point {name}: side A has shape {a.shape}, side B {b.shape}")
    return point_stats(a, b, ulp_dtype, valid, logits, text)


def _notes(ma: dict, mb: dict) -> tuple[str, ...]:
    notes = []
    for label, m in (("A", ma), ("B", mb)):
        pad = m.get("notes", {}).get("vocab_padding")
        if pad:
            notes.append(
                f"side {label} ({m.get('impl')}) scores {pad['rows']} vocabulary padding rows; real rows "
                f"compared; argmax in the padding rows at {pad['argmax_in_padding']} of "
                f"{pad['positions']} positions"
            )
    return tuple(notes)


def judge(c: Comparison, tols: tol.Tolerances) -> Comparison:
    """The comparison with every record (and local record) judged under `tols`."""
    records = tuple(
        dataclasses.replace(
            r,
            judgement=tols.judge(r.point, r.stats) if r.stats else None,
            local_judgement=tols.judge(r.point, r.local) if r.local else None,
        )
        for r in c.records
    )
    return dataclasses.replace(c, tolerances=tols, records=records)


# -- saved comparisons --------------------------------------------------------------------------------------------
def save(c: Comparison, path: str) -> None:
    from converters.convert import atomic_output

    with atomic_output(path, False, True) as tmp:
        with open(tmp, "w") as f:
            json.dump(c.to_dict(), f, indent=1)


def load(path: str) -> Comparison:
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise InputsError(describe(path, what=f"not a saved comparison: {e}")) from None
    if d.get("schema") != SCHEMA:
        raise InputsError(describe(path, "schema", SCHEMA, d.get("schema")))
    records = tuple(
        PointRecord(
            r["point"],
            r["status"],
            PointStats.from_dict(r["stats"]) if r["stats"] else None,
            None,
            PointStats.from_dict(r["local"]["stats"]) if r.get("local") else None,
            None,
            TruthPoint.from_dict(r["truth"]) if r.get("truth") else None,
        )
        for r in d["points"]
    )
    return Comparison(
        d["sides"],
        d["manifest_differences"],
        tol.Tolerances(d["profile"], (), None, d.get("tolerances", {}).get("require_propagated", False)),
        records,
        d["ulp_dtype"],
        d["teacher_forced"],
        d["valid_positions"],
        tuple(d.get("notes", ())),
        d.get("truth", {}).get("side"),
    )


def rejudge(path: str, profile: str | None = None, policy: str | None = None) -> Comparison:
    """A saved comparison (`--save`) judged again under `profile` / `policy` (default: chosen from its manifests)."""
    c = load(path)
    return judge(c, tol.tolerances(profile, policy, c.sides["A"]["manifest"], c.sides["B"]["manifest"]))


def curve_row(block: int, r: PointRecord, prev: PointRecord | None) -> dict[str, Any]:
    """One row of an amplification curve: the point's max_rel (local beside it when teacher-forced) and its ratio to
    the previous row's point (> 1 where that unit amplifies error)."""
    err = r.stats.max_rel if r.stats else None
    before = prev.stats.max_rel if prev is not None and prev.stats else None
    return {
        "block": block,
        "point": r.point,
        "max_rel": err,
        "ratio": (err / before) if err is not None and before else None,
        "local_max_rel": r.local.max_rel if r.local else None,
        "passed": r.passed,
    }
