"""The records of `parity compare --generate`: per step of a row (picks, margins, KL, top-5 overlap, near-tie
threshold), per row (its divergences), and the whole comparison (rows, the step logits and KV-cache points)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from parity.compare import tolerances as tol
from parity.compare.core import PointRecord, _finite
from parity.compare.stats import kl_rows, top_counts

SCHEMA = "parity.compare.generate/1"


@dataclasses.dataclass(frozen=True)
class Step:
    step: int
    token_a: int
    token_b: int
    margin_a: float  # top-1 minus top-2 logit of side A
    margin_b: float
    kl: float  # KL(softmax A || softmax B), nats
    top5: float  # |top5(A) & top5(B)| / 5
    near_tie_below: float  # margins under this are near-ties (the profile's logit tolerance at this step)
    comparable: bool  # both sides had the same history up to this step
    one_hot: bool = False  # both softmaxes one-hot to float32 resolution: kl says nothing (stats.ONE_HOT_TAIL)

    @property
    def agrees(self) -> bool:
        return self.token_a == self.token_b

    @property
    def near_tie(self) -> bool:
        return min(self.margin_a, self.margin_b) < self.near_tie_below


@dataclasses.dataclass(frozen=True)
class Row:
    row: int
    steps: tuple[Step, ...]
    text_a: str | None = None
    text_b: str | None = None

    @property
    def divergences(self) -> tuple[Step, ...]:
        """Comparable steps whose picks differ (after the first one only under teacher forcing)."""
        return tuple(s for s in self.steps if s.comparable and not s.agrees)

    @property
    def first_divergence(self) -> int | None:
        d = self.divergences
        return d[0].step if d else None

    @property
    def passed(self) -> bool:
        return all(s.near_tie for s in self.divergences)

    def to_dict(self) -> dict[str, Any]:
        first = self.divergences[0] if self.divergences else None
        return {
            "row": self.row,
            "first_divergence": self.first_divergence,
            "first_divergence_near_tie": None if first is None else first.near_tie,
            "divergences": [{"step": s.step, "near_tie": s.near_tie} for s in self.divergences],
            "passed": self.passed,
            "tokens_a": [s.token_a for s in self.steps],
            "tokens_b": [s.token_b for s in self.steps],
            "text_a": self.text_a,
            "text_b": self.text_b,
            "steps": [{**dataclasses.asdict(s), "near_tie": s.near_tie} for s in self.steps],
        }


@dataclasses.dataclass(frozen=True)
class GenerationComparison:
    """Truthy when every divergence is a near-tie and the step logits and KV caches pass."""

    sides: dict[str, dict[str, Any]]
    differences: list[dict[str, Any]]
    tolerances: tol.Tolerances
    steps: int
    teacher_forced: bool
    rows: tuple[Row, ...]
    records: tuple[PointRecord, ...]  # decode/logits, then the cache points
    notes: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return all(r.passed for r in self.rows) and all(r.passed for r in self.records)

    @property
    def exit_code(self) -> int:
        return 0 if self else 1

    @property
    def first_divergence(self) -> str | None:
        """The first failing thing: 'row R step T' (a divergence not at a near-tie), else the first failing point."""
        for r in self.rows:
            bad = [s for s in r.divergences if not s.near_tie]
            if bad:
                return f"row {r.row} step {bad[0].step}"
        return next((r.point for r in self.records if not r.passed), None)

    def to_dict(self) -> dict[str, Any]:
        return _finite(
            {
                "schema": SCHEMA,
                "passed": bool(self),
                "first_divergence": self.first_divergence,
                "steps": self.steps,
                "teacher_forced": self.teacher_forced,
                "profile": self.tolerances.profile,
                "tolerances": self.tolerances.to_dict(),
                "sides": self.sides,
                "manifest_differences": self.differences,
                "notes": list(self.notes),
                "rows": [r.to_dict() for r in self.rows],
                "points": [r.to_dict() for r in self.records],
            }
        )


def margins(logits: np.ndarray) -> np.ndarray:
    """top-1 minus top-2 score of each row of float[..., V] (float64)."""
    part = np.partition(logits.astype(np.float64), -2, axis=-1)
    return part[..., -1] - part[..., -2]


def build_row(r: int, ta, tb, bound: float, teacher_forced: bool, tok) -> Row:
    """Row `r` of two generations (tokens int[B, N], logits float[B, N, V]): per step the picks, both margins,
    KL(A || B) and the top-5 overlap (stats.kl_rows / top_counts), the near-tie threshold (`bound` times max |A's
    logits|); a step is comparable while both histories agree (always when teacher-forced)."""
    la, lb = ta["logits"][r], tb["logits"][r]  # [N, V]
    ka, kb = ta["tokens"][r].tolist(), tb["tokens"][r].tolist()
    (kl, one_hot), ma_, mb_ = kl_rows(la, lb), margins(la), margins(lb)
    top5 = top_counts(la, lb, 5) / min(5, la.shape[-1])
    scale = np.abs(la).max(-1) * bound
    steps, same = [], True
    for t in range(len(ka)):
        steps.append(
            Step(
                t,
                ka[t],
                kb[t],
                float(ma_[t]),
                float(mb_[t]),
                float(kl[t]),
                float(top5[t]),
                float(scale[t]),
                same or teacher_forced,
                bool(one_hot[t]),
            )
        )
        same = same and ka[t] == kb[t]
    text = None
    if tok is not None:
        from parity.processor import decode_tokens

        text = (decode_tokens(tok, ka), decode_tokens(tok, kb))
    return Row(r, tuple(steps), *(text or (None, None)))
