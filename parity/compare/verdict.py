"""The verdict of a comparison: two questions kept apart.

1. Does side B compute the same function as side A? Judged on *local* errors when `--teacher-forced` gave them:
   each unit of B run on A's input to it, against A's output. The units are the blocks (ViT, LLM) and the units
   between and after them (points.graph_units: the ViT's final norm, the projector, the image/text concatenation
   with the embedding scale, the final norm, the head), so that every unit passing means the same function. Every
   unit within tolerance: the same function (exit 0), whatever the outputs drifted to. A unit out of tolerance: B
   computes differently there (exit 1), named. The stem (patch embedding, position embedding) has nothing upstream
   of it but the image, so its propagated error *is* its local error: it is judged on that and counts as covered.
2. How far apart do the outputs end up? The propagated error at the last compared point (the drift), after N
   units, and how much of it is amplified rounding: drift / the largest local error of any unit (×A), with the
   unit that amplifies most (the largest ratio of a block's propagated error to its input's, `amplification()`).

A compared point without a local error (other than the stem's) is not covered: a backend that runs only blocks (a
BlockBackend, not a UnitBackend, e.g. an outside port) leaves the units between them uncovered. The verdict names
them; their propagated error is reported, not judged. With everything covered it says so: "the whole graph".

Without local errors (no `--teacher-forced`), or when the policy says `require_propagated = true`, the verdict is
judged on every point's propagated error (and local error, where present), as `parity compare` always did; a
propagated failure then ends with a line suggesting `--teacher-forced`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

UNIT = re.compile(r"^(img/block\d+|llm/layer\d+)/")
NAMES = {  # the units between and after the blocks (points.graph_units), by their output point, in words
    "img/encoder_norm": "ViT final norm",
    "img/projector": "projector",
    "llm/input_embeddings": "image/text concatenation + embedding scale",
    "llm/final_norm": "final norm",
    "logits": "head",
}
STEM = ("img/patch_embed", "img/with_posemb")  # nothing upstream but the image: judged on propagated error
HINT = "run with --teacher-forced to tell amplified rounding from a unit that computes differently"


@dataclasses.dataclass(frozen=True)
class Verdict:
    basis: str  # "local" | "propagated"
    passed: bool
    words: str  # one sentence per question, for people
    drift: float | None  # propagated max_rel at the last compared point
    drift_point: str | None
    units: int  # teacher-forced units (blocks and the units between them)
    amplification: float | None  # drift / largest local error
    most_amplifying_unit: str | None
    most_amplifying_ratio: float | None
    first_differing_unit: str | None
    covered: str | None  # "2 ViT + 3 LLM blocks, stem, projector, ..." ("the whole graph (...)" when all are)
    not_covered: tuple[str, ...] = ()
    hint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["not_covered"] = list(self.not_covered)
        return d


def _unit(point: str) -> str | None:
    """The unit a point belongs to: its block ("llm/layer01"), or itself for a unit between the blocks; a training
    step's loss and gradient points: the unit whose backward computes them (points.train_point_unit)."""
    if point.startswith(("grad/", "train/", "param/")):
        from parity.points import train_point_unit

        return train_point_unit(point)
    if point in NAMES:
        return point
    m = UNIT.match(point)
    return m.group(1) if m else None


def _most_amplifying(amplification: dict[str, list[dict[str, Any]]]) -> tuple[str | None, float | None]:
    rows = [r for rows in amplification.values() for r in rows if r["ratio"] is not None]
    if not rows:
        return None, None
    best = max(rows, key=lambda r: r["ratio"])
    return _unit(best["point"]) or best["point"], best["ratio"]


def _e(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1e}"


def decide(records, teacher_forced: bool, require_propagated: bool, amplification) -> Verdict:
    """The verdict over judged `records` (core.PointRecord, forward order; see the module docstring)."""
    compared = [r for r in records if r.stats is not None]
    last = compared[-1] if compared else None
    drift, drift_point = (last.stats.max_rel, last.point) if last else (None, None)
    unit_of = {r.point: _unit(r.point) for r in records}
    pos = {r.point: i for i, r in enumerate(records)}
    local = [r for r in records if r.local_judgement is not None and unit_of[r.point]]
    blocks = list(dict.fromkeys(unit_of[r.point] for r in local))
    largest = max(local, key=lambda r: r.local.max_rel, default=None)
    amp = drift / largest.local.max_rel if largest is not None and largest.local.max_rel and drift else None
    most, ratio = _most_amplifying(amplification)
    base = dict(
        drift=drift,
        drift_point=drift_point,
        units=len(blocks),
        amplification=amp,
        most_amplifying_unit=most,
        most_amplifying_ratio=ratio,
    )
    failing = [r for r in records if not r.passed]
    if not (teacher_forced and local) or require_propagated:
        passed = not failing
        first = failing[0].point if failing else None
        if passed:
            words = f"every point passes (propagated error; {drift_point} differs by {_e(drift)} max rel)"
        else:
            words = f"mismatch: {len(failing)} of {len(records)} points fail; first divergence {first}"
        if require_propagated and teacher_forced:
            words += " (the policy requires propagated agreement)"
        hint = None if passed or teacher_forced else HINT
        return Verdict("propagated", passed, words, **base, first_differing_unit=first, covered=None, hint=hint)

    stem = [r for r in records if r.point in STEM and r.judgement is not None]
    judged = [(r, r.judgement, "propagated = local: nothing upstream") for r in stem]
    judged += [(r, r.local_judgement, "teacher-forced") for r in local]
    judged.sort(key=lambda x: pos[x[0].point])
    vit = sum(b.startswith("img/block") for b in blocks)
    llm = sum(b.startswith("llm/layer") for b in blocks)
    parts = [f"{vit} ViT + {llm} LLM blocks"] + (["stem"] if stem else []) + [NAMES[b] for b in blocks if b in NAMES]
    covered = ", ".join(parts)
    not_covered = tuple(
        dict.fromkeys(
            NAMES.get(r.point, r.point)
            for r in records
            if r.stats is not None and r.local_judgement is None and r.point not in STEM
        )
    )
    if not not_covered and stem and all(p in blocks for p in NAMES):
        covered = f"the whole graph ({', '.join([parts[1], parts[0], *parts[2:]])})"
    bad = next(((r, j, how) for r, j, how in judged if not j), None)
    coverage = f"local: {covered}" + (f"; not covered: {', '.join(not_covered)}" if not_covered else "")
    if bad is not None:
        r, j, how = bad
        unit = unit_of[r.point] or f"stem ({r.point})"
        label = NAMES.get(unit, unit)
        words = (
            f"B computes differently: first differing unit {label} ({how} error at {r.point}: "
            f"{_e(r.local.max_rel if how == 'teacher-forced' else r.stats.max_rel)} max rel, over {_bound(j)}). "
            + coverage
        )
        return Verdict(
            "local", False, words, **base, first_differing_unit=unit, covered=covered, not_covered=not_covered
        )
    same = (
        f"same function: every unit passes teacher-forced (largest local error {_e(largest.local.max_rel)} at "
        f"{largest.point})"
    )
    if amp is not None and amp > 1:
        drift_words = (
            f"outputs drift by {_e(drift)} (max rel at {drift_point}) after {len(blocks)} units through amplified "
            f"rounding (×{amp:.1f} the largest local error)"
        )
    else:
        drift_words = f"outputs differ by {_e(drift)} (max rel at {drift_point}) after {len(blocks)} units"
    if most is not None:
        drift_words += f"; most amplifying unit {most} (×{ratio:.2f})"
    if failing:
        drift_words += f"; {len(failing)} points exceed the profile propagated (not judged: see the table)"
    words = f"{same}; {drift_words}. {coverage}"
    return Verdict("local", True, words, **base, first_differing_unit=None, covered=covered, not_covered=not_covered)


def _bound(j) -> str:
    c = next((c for c in j.checks if not c.passed), None)
    if c is None:
        return j.reason or "the profile"
    return f"{c.stat} {c.bound:.0e} ({j.source})"
