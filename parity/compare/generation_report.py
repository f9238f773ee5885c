"""The terminal report of `parity compare --generate`: sides, profile, per row the first divergence (near-tie or
not), the decoded text, a step table (KL labelled "one-hot" where both softmaxes are, stats.ONE_HOT_TAIL), the step
logits and KV-cache points, the verdict."""

from __future__ import annotations

from parity.compare.core import COMPARED
from parity.compare.generation_records import GenerationComparison
from parity.compare.report import _bound, _g


def render(c: GenerationComparison, console=None) -> None:
    """The terminal report: sides, profile, per row the first divergence (near-tie or not), text, a step table."""
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
    con.print(
        f"{c.steps} greedy steps{' (side B fed side A tokens: teacher-forced)' if c.teacher_forced else ''}"
        f"; profile [bold]{c.tolerances.profile}[/bold]"
    )
    if c.differences:
        con.print("manifest differences: " + "; ".join(f"{d['key']}: {d['a']} → {d['b']}" for d in c.differences))
    for n in c.notes:
        con.print(f"note: {n}")
    for r in c.rows:
        d = r.divergences
        if not d:
            head = "[green]same tokens at every step[/green]"
        else:
            head = f"first divergence at step {d[0].step} " + (
                "[yellow](near-tie: margin below the logit tolerance, not a bug)[/yellow]"
                if d[0].near_tie
                else "[bold red](not a near-tie)[/bold red]"
            )
            if len(d) > 1:
                head += f"; {len(d)} disagreeing steps ({sum(not s.near_tie for s in d)} not near-ties)"
        con.print(f"[bold]row {r.row}[/bold]: {head}")
        if r.text_a is not None:
            con.print(f"  A: {r.text_a!r}\n  B: {r.text_b!r}")
        t = Table("step", "token A", "token B", "margin A", "margin B", "near-tie <", "KL(A‖B)", "top-5")
        for s in r.steps:
            mark = "" if s.agrees else ("[yellow]" if s.near_tie else "[bold red]")
            t.add_row(
                str(s.step),
                str(s.token_a),
                f"{mark}{s.token_b}" + ("[/]" if mark else ""),
                _g(s.margin_a),
                _g(s.margin_b),
                _g(s.near_tie_below),
                "one-hot" if s.one_hot else _g(s.kl),
                f"{s.top5:.0%}" + ("" if s.comparable else " (diverged)"),
            )
        con.print(t)
    t = Table("point", "max abs", "max rel", "cosine", "tolerance", "pass")
    for r in c.records:
        if r.status != COMPARED:
            t.add_row(r.point, "-", "-", "-", "-", f"[yellow]{r.status}[/yellow]")
            continue
        t.add_row(
            r.point,
            _g(r.stats.max_abs),
            _g(r.stats.max_rel),
            f"{r.stats.cosine:.6f}",
            _bound(r.judgement),
            "[green]pass[/green]" if r.passed else "[bold red]FAIL[/bold red]",
        )
    con.print(t)
    for r in c.records:
        if r.judgement is not None and not r.judgement:
            con.print(f"[red]{r.judgement}[/red]")
    con.print(
        "[green]the two sides say the same thing[/green]"
        if c
        else f"[bold red]mismatch[/bold red]: first at {c.first_divergence}"
    )
