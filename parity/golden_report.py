"""Terminal reports of parity.golden: a check (`render`) and a record (`render_record`)."""

from __future__ import annotations

from typing import Any


def render(r, console=None) -> None:
    """A parity.golden.GoldenCheck: the expectation used, its notes, the comparison tables and the verdict."""
    import sys

    from rich.console import Console

    from parity.compare import generation, report

    con = console or Console(width=None if sys.stdout.isatty() else 150)
    e = r.expectation
    con.print(
        f"[bold]golden[/bold] {r.bundle}: expectation {e.device_class}/{e.profile} recorded from {e.impl} "
        f"({e.recorded}); checkpoint {r.checkpoint['path']}"
        + (" (sha256 verified)" if r.checkpoint["sha256_verified"] else " (given, not verified)")
    )
    for n in r.notes:
        con.print(f"note: {n}")
    report.render(r.capture, con)
    if r.generation is not None:
        generation.render(r.generation, con)
    con.print(
        "[green]matches the golden bundle[/green]"
        if r
        else f"[bold red]golden check failed[/bold red]: first divergence {r.first_divergence}"
    )


def render_record(rep: dict[str, Any], console=None) -> None:
    from rich.console import Console

    con = console or Console()
    e = rep["expectation"]
    con.print(
        f"recorded {e['device_class']}/{e['profile']} from {e['impl']} into {rep['bundle']} "
        f"(checkpoint {rep['manifest']['checkpoint']['path']}, {len(rep['manifest']['expectations'])} "
        f"expectation(s))"
    )
    ch = rep.get("changes")
    if ch is None:
        return
    if "points_changed" not in ch:
        con.print(ch["note"])
        return
    con.print(f"changes against {ch['against']}" + (f" ({ch['note']})" if ch.get("note") else "") + ":")
    for d in ch["manifest"]:
        con.print(f"  manifest {d['key']}: {d['a']} → {d['b']}")
    for p in ch["points_changed"]:
        con.print(f"  {p['point']}: max abs {p['max_abs']:.3g}, max rel {p['max_rel']:.3g}")
    con.print(f"  {ch['points_unchanged']} points unchanged (bit-identical)")
    if "tokens_changed_rows" in ch:
        con.print(
            f"  generated tokens changed in rows: {ch['tokens_changed_rows'] or 'none'}; step logits max abs "
            f"change {ch['step_logits_max_abs_change']}"
        )
