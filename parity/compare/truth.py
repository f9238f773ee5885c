"""`compare --truth`: a float64 run of side A's implementation as a third side, and which of A and B is further
from it. Two correct float64 implementations agree to ~1e-13 (the fp64 profile), so the float64 run stands for what
the model means; per point and overall the report says "B drifts: 4.0e-05 from float64, A 3.0e-07"."""

from __future__ import annotations

import dataclasses
from typing import Any

from parity.compare.sides import Side
from parity.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class TruthPoint:
    """max_rel of side A and of side B against the float64 truth at one point."""

    a: float
    b: float

    @property
    def drifts(self) -> str | None:
        """ "A" or "B": the side further from the truth (None when both are equally far)."""
        return None if self.a == self.b else ("B" if self.b > self.a else "A")

    def words(self) -> str:
        if self.drifts is None:
            return f"A and B equally far from float64 ({self.a:.1e})"
        far, near = (self.b, self.a) if self.drifts == "B" else (self.a, self.b)
        other = "A" if self.drifts == "B" else "B"
        return f"{self.drifts} drifts: {far:.1e} from float64, {other} {near:.1e}"

    def to_dict(self) -> dict[str, Any]:
        return {"a_max_rel": self.a, "b_max_rel": self.b, "drifts": self.drifts, "words": self.words()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TruthPoint:
        return cls(float(d["a_max_rel"]), float(d["b_max_rel"]))


def truth_side(side_a: Side) -> Side:
    """The float64 run of side A's implementation on A's checkpoint and device."""
    if not side_a.runs:
        raise ConfigError("--truth runs side A's implementation in float64: side A must be an implementation")
    spec = f"{side_a.impl}:{side_a.device}:float64"
    return Side("T", spec, impl=side_a.impl, device=side_a.device, dtype="float64", ckpt=side_a.ckpt)


def overall(records) -> dict[str, Any] | None:
    """Over every point with a truth: each side's largest max_rel against float64, where, and who drifts."""
    rows = [r for r in records if getattr(r, "truth", None) is not None]
    if not rows:
        return None
    wa = max(rows, key=lambda r: r.truth.a)
    wb = max(rows, key=lambda r: r.truth.b)
    t = TruthPoint(wa.truth.a, wb.truth.b)
    return {**t.to_dict(), "a_worst_point": wa.point, "b_worst_point": wb.point}


def lines(c) -> list[str]:
    """The terminal's truth lines: the overall words, then every point (up to 10 of them), else the first 10 points
    where the side that drifts overall is the further one."""
    o = c.truth_summary()
    if o is None:
        return []
    out = [f"truth ({c.truth_spec}): {o['words']} (A worst at {o['a_worst_point']}, B at {o['b_worst_point']})"]
    rows = [r for r in c.records if r.truth is not None]
    for r in rows[:10] if len(rows) <= 10 else [r for r in rows if r.truth.drifts == o["drifts"]][:10]:
        out.append(f"  {r.point}: {r.truth.words()}")
    return out


def html_table(c) -> str:
    """One row per point: A's and B's max_rel against the float64 truth and who drifts."""
    from html import escape

    o = c.truth_summary()
    if o is None:
        return ""
    rows = "".join(
        f"<tr><td>{escape(r.point)}</td><td>{r.truth.a:.2e}</td><td>{r.truth.b:.2e}</td>"
        f"<td>{escape(r.truth.drifts or '-')}</td></tr>"
        for r in c.records
        if r.truth is not None
    )
    return (
        f"<h2>Against float64 ({escape(c.truth_spec or '')})</h2><p id='truth'>{escape(o['words'])}</p>"
        f"<table><tr><th>point</th><th>A max rel to float64</th><th>B max rel to float64</th><th>drifts</th></tr>"
        f"{rows}</table>"
    )
