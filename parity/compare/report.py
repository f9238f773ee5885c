"""The terminal report of a comparison: header (sides, profile, first divergence, manifest differences, notes),
one table row per point (ULP: the worst error in units in the last place of the point's scale, stats.scale_ulp),
the error amplification per tower, and the verdict (verdict.py) in words. The JSON report is `Comparison.to_dict()`; its
schema is documented in the README ("parity compare", JSON schema `parity.compare/1`)."""

from __future__ import annotations

import math

from parity.compare.core import COMPARED, Comparison
from parity.compare.tolerances import HIGHER_IS_BETTER


def _g(v, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.{digits}e}" if isinstance(v, float) else str(v)


def _bound(j) -> str:
    """'≤ 1e-04' for the default statistic (max rel), else named: 'rms_rel ≤ 0.05, top1 ≥ 0.9'."""
    if j is None or not j.checks:
        return "-"
    return ", ".join(
        ("" if c.stat == "max_rel" else f"{c.stat} ")
        + ("≥ " if c.stat in HIGHER_IS_BETTER else "≤ ")
        + f"{c.bound:.0e}"
        for c in j.checks
    )


def render(c: Comparison, console=None) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    con = console or Console(width=None if sys.stdout.isatty() else 150)
    for label in ("A", "B"):
        m = c.sides[label]["manifest"]
        con.print(
            f"[bold]side {label}[/bold]: {c.sides[label]['spec']} — {m.get('impl')} {m.get('dtype')} on "
            f"{m.get('device')}, precision {m.get('precision', 'highest')}"
        )
    first = c.first_divergence
    con.print(
        f"profile [bold]{c.tolerances.profile}[/bold]"
        + (f", policy {c.tolerances.policy}" if c.tolerances.policy else "")
        + f"; ULP of {c.ulp_dtype}; {c.valid_positions}"
    )
    con.print(
        "first divergence: "
        + (f"[bold red]{first}[/bold red]" if first else "[green]none[/green]")
        + (
            f"; first local (teacher-forced) divergence: [bold red]{c.first_local_divergence or 'none'}[/bold red]"
            if c.teacher_forced
            else ""
        )
    )
    if c.differences:
        con.print("manifest differences: " + "; ".join(f"{d['key']}: {d['a']} → {d['b']}" for d in c.differences))
    for n in c.notes:
        con.print(f"note: {n}")
    t = Table(
        "point",
        "max abs",
        "max rel",
        "cosine",
        "SQNR dB",
        "ULP of scale",
        *(["local rel"] if c.teacher_forced else []),
        "tolerance",
        "pass",
    )
    for r in c.records:
        if r.status != COMPARED:
            t.add_row(r.point, *["-"] * (6 if c.teacher_forced else 5), "-", f"[yellow]{r.status}[/yellow]")
            continue
        s = r.stats
        local = [_g(r.local.max_rel) if r.local else "-"] if c.teacher_forced else []
        ok = "[green]pass[/green]" if r.passed else "[bold red]FAIL[/bold red]"
        t.add_row(
            r.point,
            _g(s.max_abs),
            _g(s.max_rel),
            f"{s.cosine:.6f}",
            f"{s.sqnr_db:.1f}",
            _ulp(s.scale_ulp),
            *local,
            _bound(r.judgement),
            ok,
        )
    con.print(t)
    for r in c.records:
        if r.stats is not None and r.stats.kl_max is not None:
            con.print(
                f"{r.point}: {kl_words(r.stats)}; top-1 agreement {r.stats.top1:.1%}, top-5 overlap {r.stats.top5:.1%}"
            )
    for r in c.records:
        for j in (r.judgement, r.local_judgement):
            if j is not None and not j:
                con.print(f"[red]{'local ' if j is r.local_judgement else ''}{j}[/red]")
    for tower, rows in c.amplification().items():
        if rows:
            con.print(
                f"amplification {tower}: "
                + "  ".join(
                    f"{row['block']}:×{row['ratio']:.2f}" if row["ratio"] is not None else f"{row['block']}:-"
                    for row in rows
                )
            )
    from parity.compare.truth import lines

    for line in lines(c):
        con.print(line)
    v = c.verdict()
    con.print(f"[green]{v.words}[/green]" if v.passed else f"[bold red]{v.words}[/bold red]")
    if v.hint:
        con.print(f"hint: {v.hint}")


def _ulp(v) -> str:
    if v is None:
        return "-"
    return "inf" if math.isinf(v) else f"{v:.3g}"


def kl_words(s) -> str:
    """KL(A‖B) in words; labelled, not printed as ~0, where the softmaxes are one-hot (stats.ONE_HOT_TAIL)."""
    one_hot = s.kl_degenerate or 0.0
    if one_hot == 1.0:
        return (
            "KL(A‖B) degenerate: every position's softmax is one-hot on both sides (mass off the top token < 2^-23), "
            f"so KL ({_g(s.kl_max)}) measures nothing"
        )
    words = f"KL(A‖B) max {_g(s.kl_max)} at {s.kl_worst_position}, mean {_g(s.kl_mean)}"
    if one_hot:
        words += f" ({one_hot:.0%} of positions one-hot on both sides: KL ~0 there says nothing)"
    return words
