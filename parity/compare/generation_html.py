"""The HTML report of `parity compare --generate`: one self-contained page, per row an inline SVG of both sides'
margins, KL and the near-tie threshold per step (log scale, the first divergence ringed) and a step table; the step
logits and KV-cache points."""

from __future__ import annotations

import html
import math

from parity.compare.generation_records import GenerationComparison, Row
from parity.compare.html import log_frame

COLORS = {"margin A": "#d62728", "margin B": "#1f77b4", "KL(A‖B)": "#2ca02c", "near-tie": "#7f7f7f"}


def _chart(r: Row, W: int = 640, H: int = 240, PAD: int = 48) -> str:
    """Per-step margins of both sides, KL and the near-tie threshold (log scale); the first divergence ringed."""
    series = {
        "margin A": [s.margin_a for s in r.steps],
        "margin B": [s.margin_b for s in r.steps],
        "KL(A‖B)": [s.kl for s in r.steps],
        "near-tie": [s.near_tie_below for s in r.steps],
    }
    vals = [v for vs in series.values() for v in vs if v > 0 and math.isfinite(v)]
    lo, hi = (math.floor(math.log10(min(vals))), math.ceil(math.log10(max(vals)))) if vals else (-8, 0)
    hi = max(hi, lo + 1)
    n = max(len(r.steps) - 1, 1)

    def xy(i, v):
        y = lo if v is None or not v > 0 else min(max(math.log10(v), lo), hi)
        return PAD + (W - 2 * PAD) * i / n, H - PAD - (H - 2 * PAD) * (y - lo) / (hi - lo)

    title = f"row {r.row}: margins and KL per step"
    out = log_frame("steps", title, W, H, PAD, lo, hi, xy)
    for s in r.steps:
        x, _ = xy(s.step, None)
        out.append(f'<text x="{x}" y="{H - PAD + 14}" text-anchor="middle" font-size="10">{s.step}</text>')
    out.append(f'<text x="{W / 2}" y="{H - 8}" text-anchor="middle" font-size="11">decode step</text>')
    for k, (name, vs) in enumerate(series.items()):
        d = " ".join(
            f"{'M' if i == 0 else 'L'}{x:.1f},{y:.1f}" for i, (x, y) in enumerate(xy(i, v) for i, v in enumerate(vs))
        )
        dash = ' stroke-dasharray="4 3"' if name == "near-tie" else ""
        out.append(
            f'<path class="series" data-series="{html.escape(name)}" d="{d}" fill="none" '
            f'stroke="{COLORS[name]}" stroke-width="2"{dash}/>'
        )
        out.append(
            f'<rect x="{W - PAD - 110}" y="{24 + 14 * k}" width="12" height="3" fill="{COLORS[name]}"/>'
            f'<text x="{W - PAD - 92}" y="{29 + 14 * k}" font-size="11">{html.escape(name)}</text>'
        )
    if r.first_divergence is not None:
        s = r.steps[r.first_divergence]
        x, y = xy(s.step, min(s.margin_a, s.margin_b))
        out.append(
            f'<circle class="first" cx="{x:.1f}" cy="{y:.1f}" r="8" fill="none" stroke="#000" stroke-width="2"/>'
        )
    return "".join(out) + "</svg>"


def render_html(c: GenerationComparison) -> str:
    esc = html.escape
    verdict = "the two sides say the same thing" if c else f"mismatch: first at {c.first_divergence}"
    rows = []
    for r in c.rows:
        d = r.divergences
        head = (
            "same tokens at every step"
            if not d
            else f"first divergence at step {d[0].step}" + (" (near-tie)" if d[0].near_tie else " (not a near-tie)")
        )
        text = (
            f"<p>A: <code>{esc(repr(r.text_a))}</code><br>B: <code>{esc(repr(r.text_b))}</code></p>"
            if r.text_a is not None
            else ""
        )
        cells = "".join(
            f"<tr class='{'same' if s.agrees else 'tie' if s.near_tie else 'fail'}'><td>{s.step}</td>"
            f"<td>{s.token_a}</td><td>{s.token_b}</td><td>{s.margin_a:.3e}</td><td>{s.margin_b:.3e}"
            f"</td><td>{s.near_tie_below:.3e}</td><td>{'one-hot' if s.one_hot else f'{s.kl:.3e}'}</td>"
            f"<td>{s.top5:.0%}</td></tr>"
            for s in r.steps
        )
        rows.append(
            f"<h3>row {r.row}: {esc(head)}</h3>{text}{_chart(r)}<table><tr><th>step</th><th>token A</th>"
            f"<th>token B</th><th>margin A</th><th>margin B</th><th>near-tie below</th><th>KL(A‖B)</th>"
            f"<th>top-5</th></tr>{cells}</table>"
        )
    pts_ = "".join(
        f"<tr class='{'pass' if r.passed else 'fail'}'><td>{esc(r.point)}</td>"
        + (
            f"<td>{r.stats.max_abs:.2e}</td><td>{r.stats.max_rel:.2e}</td><td>{'pass' if r.passed else 'FAIL'}</td>"
            if r.stats
            else f"<td colspan='3'>{esc(r.status)}</td>"
        )
        + "</tr>"
        for r in c.records
    )
    notes = "".join(f"<li>{esc(n)}</li>" for n in c.notes)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>parity compare --generate: {esc(verdict)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }} table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 2px 6px; font-size: 12px; }} tr.fail td {{ background: #fdd; }}
tr.tie td {{ background: #ffd; }} .verdict {{ font-size: 1.3em; font-weight: bold; color: {"#080" if c else "#c00"}; }}
</style></head><body>
<h1>parity compare --generate {c.steps}</h1>
<p class="verdict" id="verdict">{esc(verdict)}</p>
<p>profile <b>{esc(c.tolerances.profile)}</b>; {
        "teacher-forced (side B fed side A tokens)" if c.teacher_forced else "free-running"
    }; side A: {esc(str(c.sides["A"]["spec"]))}; side B: {esc(str(c.sides["B"]["spec"]))}</p>
<ul>{notes}</ul>
<h2>Steps</h2>
{"".join(rows)}
<h2>Step logits and KV cache</h2>
<table><tr><th>point</th><th>max abs</th><th>max rel</th><th>pass</th></tr>{pts_}</table>
</body></html>
"""


def write_html(c: GenerationComparison, path: str) -> None:
    from converters.convert import atomic_output

    with atomic_output(path, False, True) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(render_html(c))
