"""The HTML report: one self-contained page (no network, no script): the verdict in words (verdict.py), inline SVG
error curves per tower (propagated and, when present, teacher-forced error per block on the same axes, log scale,
the tolerance as a dashed line, the first divergence marked), a table of the units with their local and propagated
error side by side, the point table, the manifest comparison and the environment of both sides."""

from __future__ import annotations

import html
import json
import math

from parity.compare.core import COMPARED, Comparison
from parity.compare.truth import html_table as truth_table

W, H, PAD = 640, 240, 48
TOWERS = (  # forward curves, then (a training step's) backward curves beside them: the gradient at each block's input
    ("img", "vision tower (ViT blocks)"),
    ("llm", "text tower (LLM blocks)"),
    ("llm_backward", "text tower backward (gradient at each block's input)"),
    ("img_backward", "vision tower backward (gradient at each block's input)"),
)
COLORS = {"propagated": "#d62728", "teacher-forced": "#1f77b4", "tolerance": "#7f7f7f"}


def _esc(x) -> str:
    return html.escape(str(x))


def log_frame(cls: str, title: str, W: int, H: int, PAD: int, lo: int, hi: int, xy, grid: bool = False) -> list[str]:
    """The opening of an inline SVG chart with a log-scale y axis 1e`lo`..1e`hi`: title, axes, decade labels (and
    light grid lines); `xy(i, v)` maps a point to pixels. Callers append the series and close the <svg>."""
    parts = [
        f'<svg class="{cls}" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        f'viewBox="0 0 {W} {H}" role="img" aria-label="{_esc(title)}">',
        f'<text x="{W / 2}" y="16" text-anchor="middle" font-weight="bold">{_esc(title)}</text>',
        f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="#000"/>',
        f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}" stroke="#000"/>',
    ]
    for e in range(lo, hi + 1):
        _, y = xy(0, 10.0**e)
        parts.append(
            f'<text x="{PAD - 4}" y="{y + 4}" text-anchor="end" font-size="10">1e{e}</text>'
            + (f'<line x1="{PAD}" y1="{y}" x2="{W - PAD}" y2="{y}" stroke="#eee"/>' if grid else "")
        )
    return parts


def _curve_svg(title: str, rows: list[dict], bound: float | None, first: str | None) -> str:
    series = {
        "propagated": [(r["block"], r["max_rel"]) for r in rows],
        "teacher-forced": [(r["block"], r["local_max_rel"]) for r in rows if r["local_max_rel"] is not None],
    }
    values = [v for s in series.values() for _, v in s if v and v > 0] + ([bound] if bound else [])
    lo, hi = (math.log10(min(values)), math.log10(max(values))) if values else (-8.0, 0.0)
    lo, hi = math.floor(lo), math.ceil(hi) if math.ceil(hi) > math.floor(lo) else math.floor(lo) + 1
    n = max(len(rows) - 1, 1)

    def xy(i, v):
        y = lo if not v or v <= 0 else math.log10(v)
        return PAD + (W - 2 * PAD) * i / n, H - PAD - (H - 2 * PAD) * (y - lo) / (hi - lo)

    parts = log_frame("curve", title, W, H, PAD, lo, hi, xy, grid=True)
    for r in rows:
        x, _ = xy(r["block"], None)
        parts.append(f'<text x="{x}" y="{H - PAD + 14}" text-anchor="middle" font-size="10">{r["block"]}</text>')
    parts.append(
        f'<text x="{W / 2}" y="{H - 8}" text-anchor="middle" font-size="11">block (residual stream '
        f"after it); y: max relative error to side A</text>"
    )
    if bound:
        _, y = xy(0, bound)
        parts.append(
            f'<line class="tolerance" x1="{PAD}" y1="{y}" x2="{W - PAD}" y2="{y}" '
            f'stroke="{COLORS["tolerance"]}" stroke-dasharray="4 3"/>'
        )
    for name, pts_ in series.items():
        if not pts_:
            continue
        d = " ".join(f"{'M' if k == 0 else 'L'}{x:.1f},{y:.1f}" for k, (x, y) in enumerate(xy(i, v) for i, v in pts_))
        parts.append(f'<path class="series {name}" d="{d}" fill="none" stroke="{COLORS[name]}" stroke-width="2.5"/>')
        for i, v in pts_:
            x, y = xy(i, v)
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{COLORS[name]}"/>')
    for r in rows:  # ring the block holding the first divergence (its branch or its output)
        if first and first.startswith(r["point"].rsplit("/", 1)[0] + "/"):
            x, y = xy(r["block"], r["max_rel"])
            parts.append(
                f'<circle class="first" cx="{x:.1f}" cy="{y:.1f}" r="8" fill="none" stroke="#000" stroke-width="2"/>'
            )
    legend = [(k, c) for k, c in COLORS.items() if k != "teacher-forced" or series["teacher-forced"]]
    for k, (name, color) in enumerate(legend):
        parts.append(
            f'<rect x="{W - PAD - 130}" y="{24 + 14 * k}" width="12" height="3" fill="{color}"/>'
            f'<text x="{W - PAD - 112}" y="{29 + 14 * k}" font-size="11">{name}</text>'
        )
    return "".join(parts) + "</svg>"


def _ulp(v) -> str:
    return "-" if v is None else "inf" if math.isinf(v) else f"{v:.3g}"


def _units_table(amp: dict[str, list[dict]]) -> str:
    """Per block: its local (teacher-forced) error beside its propagated error and the amplification ratio."""
    rows = [row for tower in ("img", "llm") for row in amp.get(tower, [])]
    if not any(row["local_max_rel"] is not None for row in rows):
        return ""
    cells = "".join(
        f"<tr class='{'pass' if row['passed'] else 'fail'}'><td>{_esc(row['point'])}</td>"
        f"<td>{_num(row['local_max_rel'])}</td><td>{_num(row['max_rel'])}</td>"
        f"<td>{_ratio(row['ratio'])}</td></tr>"
        for row in rows
    )
    return (
        "<table class='units'><tr><th>unit (residual stream after it)</th><th>local (teacher-forced) max rel</th>"
        f"<th>propagated max rel</th><th>amplification</th></tr>{cells}</table>"
    )


def _num(v) -> str:
    return "-" if v is None else f"{v:.2e}"


def _ratio(v) -> str:
    return "-" if v is None else f"×{v:.2f}"


def render_html(c: Comparison) -> str:
    amp = c.amplification()
    first = c.first_divergence
    curves = []
    for tower, title in TOWERS:
        if amp.get(tower):
            j = next((r.judgement for r in c.records if r.point == amp[tower][0]["point"]), None)
            bound = next((ch.bound for ch in j.checks if ch.stat == "max_rel"), None) if j is not None else None
            curves.append(_curve_svg(title, amp[tower], bound, first))
    rows = []
    for r in c.records:
        if r.status != COMPARED:
            rows.append(f"<tr><td>{_esc(r.point)}</td><td colspan='7' class='na'>{_esc(r.status)}</td></tr>")
            continue
        s = r.stats
        local = f"{r.local.max_rel:.2e}" if r.local else "-"
        bound = ", ".join(f"{ch.stat} {ch.bound:.0e}" for ch in r.judgement.checks) if r.judgement is not None else "-"
        cls = "pass" if r.passed else "fail"
        rows.append(
            f"<tr class='{cls}'><td>{_esc(r.point)}</td><td>{s.max_abs:.2e}</td><td>{s.max_rel:.2e}</td>"
            f"<td>{s.cosine:.6f}</td><td>{s.sqnr_db:.1f}</td><td>{_ulp(s.scale_ulp)}</td><td>{local}</td>"
            f"<td>{_esc(bound)}</td><td>{'pass' if r.passed else 'FAIL'}</td></tr>"
        )
    diffs = (
        "".join(
            f"<tr><td>{_esc(d['key'])}</td><td>{_esc(d['a'])}</td><td>{_esc(d['b'])}</td></tr>" for d in c.differences
        )
        or "<tr><td colspan='3'>none</td></tr>"
    )
    env = "".join(
        f"<h3>side {k}: {_esc(v['spec'])}</h3><pre>{_esc(json.dumps(v['manifest'], indent=1))}</pre>"
        for k, v in c.sides.items()
    )
    notes = "".join(f"<li>{_esc(n)}</li>" for n in c.notes)
    v = c.verdict()
    verdict = "every point passes" if c else f"mismatch: first divergence {first}"
    if v.basis == "local":
        verdict = (
            "same function (teacher-forced units pass)" if v else f"computes differently: {v.first_differing_unit}"
        )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>parity compare: {_esc(verdict)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }} table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 2px 6px; font-size: 12px; }} tr.fail td {{ background: #fdd; }}
td.na {{ color: #a60; }} pre {{ font-size: 11px; background: #f6f6f6; padding: 6px; }}
.verdict {{ font-size: 1.3em; font-weight: bold; color: {"#080" if c else "#c00"}; }}
</style></head><body>
<h1>parity compare</h1>
<p class="verdict" id="verdict">{_esc(verdict)}</p>
<p id="verdict-words">{_esc(v.words)}{"<br>hint: " + _esc(v.hint) if v.hint else ""}</p>
<p>profile <b>{_esc(c.tolerances.profile)}</b>{", policy " + _esc(c.tolerances.policy) if c.tolerances.policy else ""};
ULP of {_esc(c.ulp_dtype)}; {_esc(c.valid_positions)}; first divergence: <b id="first">{_esc(first or "none")}</b>
{
        "; first local (teacher-forced) divergence: <b>" + _esc(c.first_local_divergence or "none") + "</b>"
        if c.teacher_forced
        else ""
    }</p>
<ul>{notes}</ul>
<h2>Error per block</h2>
{"".join(curves)}
{_units_table(amp)}
<h2>Points</h2>
<table><tr><th>point</th><th>max abs</th><th>max rel</th><th>cosine</th><th>SQNR dB</th><th>ULP of scale</th>
<th>local rel</th><th>tolerance</th><th>pass</th></tr>
{"".join(rows)}</table>
{truth_table(c)}
<h2>Manifest differences (A → B)</h2>
<table><tr><th>field</th><th>A</th><th>B</th></tr>{diffs}</table>
<h2>Environment</h2>
{env}
</body></html>
"""


def write_html(c: Comparison, path: str) -> None:
    from converters.convert import atomic_output

    with atomic_output(path, False, True) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(render_html(c))
