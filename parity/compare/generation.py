"""`parity compare --generate N`: do the two sides *say* the same thing?

Both sides decode greedily from the same inputs for N steps (ignore_eos by default, so every step counts), each in
its own process, writing a generation file: `tokens` int32[B, N] (each side's own picks), the step `logits`
float32[B, N, V] (the distribution each pick came from) and the `llm/layerNN/{k,v}_cache` points at the end.

Per row: the first step where the picks differ. Per step, on each side, the top-1 / top-2 logit margin; between
them KL(A || B) of the step distributions and the top-5 overlap. A divergence where either side's margin is below
the profile's logit tolerance (its `logits` max_rel bound times max |A's logits| at that step: the largest logit
error the profile accepts) is a *near-tie*: labelled as such, not a failure.

Teacher forcing (`teacher_forced`): side B is fed side A's tokens (the implementations' `forced_tokens` path through
their own cached decode, so B's step logits are its real decode logits, decode-only softcap and sliding-window cache
masks included, which a full forward of prompt + tokens would not reproduce) and later steps stay comparable after
a divergence: every step is compared, and each disagreement of B's pick with A's is listed.

Without teacher forcing, a row's steps after its first divergence have different histories: they are shown but not
judged, and its cache slots from the divergent token on are not compared.

Passes (exit 0) when every divergence is a near-tie, the step logits of the comparable steps pass the profile's
`logits` rule, and every cache point passes its rule over the real slots.
"""

from __future__ import annotations

import dataclasses
import html
import math
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from parity import points as pts
from parity.compare import tolerances as tol
from parity.compare.core import (
    COMPARED,
    MISSING_A,
    MISSING_B,
    PointRecord,
    _finite,
    check_manifests,
    manifest_differences,
    resolve_sides,
)
from parity.compare.sides import Side, job, run_side
from parity.compare.stats import point_stats
from parity.config import PaliGemmaConfig
from parity.errors import ConfigError, InputsError, describe
from parity.estimate import Work

SCHEMA = "parity.compare.generate/1"
STEP_LOGITS = "decode/logits"  # the record of the step logits (judged by the profile's `logits` rule)


# -- one side: a generation file ------------------------------------------------------------------------------------
def generation_job(
    side: Side,
    inputs: str,
    output: str,
    convention: str,
    config: str | None,
    steps: int,
    ignore_eos: bool = True,
    forced_from: str | None = None,
) -> dict[str, Any]:
    return {
        **job(side, inputs, output, convention, config, None),
        "generate": steps,
        "ignore_eos": ignore_eos,
        "forced_from": forced_from,
    }


def run_generation_job(j: dict[str, Any]) -> dict[str, Any]:
    """Greedy decoding of one side (fed the tokens of `forced_from` when given) into a generation file."""
    from parity import run

    api, model, cfg, batch, manifest = run.prepare(
        j["ckpt"],
        j["inputs"],
        j["impl"],
        j["convention"],
        j["dtype"],
        j["device"],
        j["config"],
        precision=j["precision"],
        work=Work("generate", new_tokens=j["generate"], step_logits=True, cache_points=True),
    )
    kw = {}
    if j.get("forced_from"):
        tensors, _ = run.read_capture(j["forced_from"])
        kw["forced_tokens"] = tensors["tokens"]
    t0 = time.perf_counter()
    g = api.generate(
        model,
        batch,
        j["generate"],
        greedy=True,
        return_logits=True,
        capture=list(pts.cache_points(cfg)),
        ignore_eos=j["ignore_eos"],
        **kw,
    )
    arrays = {
        "tokens": np.ascontiguousarray(g["tokens"], np.int32),
        "logits": np.ascontiguousarray(g["logits"], np.float32),
    }
    arrays.update({k: np.ascontiguousarray(g[k], np.float32) for k in pts.cache_points(cfg) if k in g})
    manifest.update(
        points=list(arrays),
        run_seconds=round(time.perf_counter() - t0, 3),
        sampling={"greedy": True, "max_new_tokens": j["generate"], "ignore_eos": j["ignore_eos"]},
        decode_path=g.get("decode_path"),
        forced_tokens_from=j.get("forced_from"),
    )
    run.write_capture(j["output"], arrays, manifest, True)
    return {"capture": j["output"], "teacher": None}


# -- records ----------------------------------------------------------------------------------------------------
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


# -- the comparison -------------------------------------------------------------------------------------------------
def compare_generation(
    a: str | None = None,
    b: str | None = None,
    ckpt: str | None = None,
    against: str | None = None,
    inputs: str | None = None,
    steps: int = 8,
    impl: str = "torch",
    convention: str | None = None,
    config: str | None = None,
    teacher_forced: bool = False,
    ignore_eos: bool = True,
    profile: str | None = None,
    policy: str | None = None,
    allow_convention_mismatch: bool = False,
    tokenizer: str | None = None,
    isolate: bool = True,
    progress: Callable[[str], None] | None = None,
) -> GenerationComparison:
    """Decode `steps` tokens greedily on both sides (run sides, or generation files) and compare them."""
    if steps < 1:
        raise ConfigError(f"--generate must be >= 1, got {steps}")
    side_a, side_b = resolve_sides(a, b, ckpt, against, impl)
    running = [s for s in (side_a, side_b) if s.runs]
    if teacher_forced and not side_b.runs:
        raise ConfigError(
            "--teacher-forced feeds side A's tokens to side B: side B must be an implementation, not a generation file"
        )
    if running and inputs is None:
        raise ConfigError("--inputs is required to run a side")
    inputs = os.path.abspath(inputs) if inputs else None
    if convention is None:
        convention = "transformers" if any(s.impl == "transformers" for s in running) else "big_vision"
    say = progress or (lambda msg: None)
    with tempfile.TemporaryDirectory(prefix="parity-generate-") as tmp:
        paths = {}
        for side in (side_a, side_b):
            if not side.runs:
                paths[side.label] = side.capture
                continue
            say(f"side {side.label}: {side.describe()}, {steps} greedy steps")
            forced = paths["A"] if teacher_forced and side.label == "B" else None
            j = generation_job(
                side,
                inputs,
                os.path.join(tmp, f"{side.label}.generation.safetensors"),
                convention,
                config,
                steps,
                ignore_eos,
                forced,
            )
            r = run_side(j) if isolate else run_generation_job(j)  # the worker dispatches on j["generate"]
            paths[side.label] = r["capture"]
        say("comparing")
        return compare_generation_files(
            paths["A"],
            paths["B"],
            {"A": side_a, "B": side_b},
            teacher_forced,
            profile,
            policy,
            allow_convention_mismatch,
            tokenizer,
            inputs,
        )


def _read(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    from parity.run import read_capture

    tensors, manifest = read_capture(path)
    for key in ("tokens", "logits"):
        if key not in tensors:
            raise InputsError(describe(path, key, "a generation file (tokens and step logits)", "no such tensor"))
    return tensors, manifest


def compare_generation_files(
    path_a: str,
    path_b: str,
    sides: dict[str, Side] | None = None,
    teacher_forced: bool = False,
    profile: str | None = None,
    policy: str | None = None,
    allow_convention_mismatch: bool = False,
    tokenizer: str | None = None,
    inputs: str | None = None,
) -> GenerationComparison:
    """Compare two generation files (B's fed A's tokens when `teacher_forced`). The real prompt slots of the KV
    caches come from `inputs` (verified against the sides' digest), else from the inputs file recorded in A's
    manifest when it is still there unchanged; else every prompt slot is compared and a note says so."""
    (ta, ma), (tb, mb) = _read(path_a), _read(path_b)
    check_manifests(ma, mb, allow_convention_mismatch)
    cfg = PaliGemmaConfig.from_dict(ma["config"])
    tols = tol.tolerances(profile, policy, ma, mb)
    notes = []
    n = min(ta["logits"].shape[1], tb["logits"].shape[1])  # rows stopped at <eos> (--stop-at-eos): shorter runs
    if ta["logits"].shape[1] != tb["logits"].shape[1]:
        notes.append(
            f"side A decoded {ta['logits'].shape[1]} steps, side B {tb['logits'].shape[1]} (every row "
            f"stopped at <eos>): the first {n} compared"
        )
    ta = {**ta, "tokens": ta["tokens"][:, :n], "logits": ta["logits"][:, :n]}
    tb = {**tb, "tokens": tb["tokens"][:, :n], "logits": tb["logits"][:, :n]}
    if ta["tokens"].shape != tb["tokens"].shape or ta["logits"].shape != tb["logits"].shape:
        raise InputsError(
            f"the two generations differ in shape: A tokens {list(ta['tokens'].shape)} logits "
            f"{list(ta['logits'].shape)}, B tokens {list(tb['tokens'].shape)} logits "
            f"{list(tb['logits'].shape)} (same --generate on both sides?)"
        )
    rule = tols.rule_for(pts.LOGITS)
    bound = dict(rule.bounds).get("max_rel", 0.0) if rule is not None else 0.0
    tok = None
    if tokenizer is not None:
        from parity.processor import Tokenizer

        tok = Tokenizer(tokenizer)
    rows = tuple(_row(r, ta, tb, bound, teacher_forced, tok) for r in range(ta["tokens"].shape[0]))
    comparable = np.array([[s.comparable for s in r.steps] for r in rows], bool)
    stats = point_stats(ta["logits"], tb["logits"], tol.compared_dtype(ma, mb), comparable, True)
    judged = tols.judge(pts.LOGITS, stats)
    records = [PointRecord(STEP_LOGITS, COMPARED, stats, dataclasses.replace(judged, point=STEP_LOGITS))]
    steps = ma.get("sampling", {}).get("max_new_tokens", n)
    slots, slots_what = _cache_slots(cfg, ma, rows, steps, teacher_forced, inputs)
    if slots_what:
        notes.append(f"KV cache prompt slots: {slots_what}")
    for name in pts.cache_points(cfg):
        have_a, have_b = name in ta, name in tb
        if not (have_a or have_b):
            continue
        if not (have_a and have_b):
            records.append(PointRecord(name, MISSING_B if have_a else MISSING_A))
            continue
        if ta[name].shape != tb[name].shape:
            raise InputsError(f"point {name}: side A has shape {ta[name].shape}, side B {tb[name].shape}")
        s = point_stats(ta[name], tb[name], tol.compared_dtype(ma, mb), slots)
        records.append(PointRecord(name, COMPARED, s, tols.judge(name, s)))
    sides_d = {
        k: {
            "spec": sides[k].spec if sides else p,
            "kind": "run" if sides and sides[k].runs else "capture",
            "manifest": m,
        }
        for k, p, m in (("A", path_a, ma), ("B", path_b, mb))
    }
    if not teacher_forced and any(r.first_divergence is not None for r in rows):
        notes.append(
            "steps after a row's first divergence have different histories: shown, not judged "
            "(--teacher-forced keeps them comparable)"
        )
    diffs = [d for d in manifest_differences(ma, mb) if d["key"] != "forced_tokens_from"]
    return GenerationComparison(
        sides_d, diffs, tols, ta["tokens"].shape[1], teacher_forced, rows, tuple(records), tuple(notes)
    )


def margins(logits: np.ndarray) -> np.ndarray:
    """top-1 minus top-2 score of each row of float[..., V] (float64)."""
    part = np.partition(logits.astype(np.float64), -2, axis=-1)
    return part[..., -1] - part[..., -2]


def _kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    la = a.astype(np.float64) - a.max(-1, keepdims=True)
    lb = b.astype(np.float64) - b.max(-1, keepdims=True)
    pa = np.exp(la)
    sa, sb = pa.sum(-1), np.exp(lb).sum(-1)
    return np.einsum("nv,nv->n", pa, la - lb) / sa - np.log(sa) + np.log(sb)


def _row(r: int, ta, tb, bound: float, teacher_forced: bool, tok) -> Row:
    la, lb = ta["logits"][r], tb["logits"][r]  # [N, V]
    ka, kb = ta["tokens"][r].tolist(), tb["tokens"][r].tolist()
    ma_, mb_, kl = margins(la), margins(lb), _kl(la, lb)
    top_a, top_b = np.argsort(-la, -1)[:, :5], np.argsort(-lb, -1)[:, :5]
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
                len(set(top_a[t].tolist()) & set(top_b[t].tolist())) / 5,
                float(scale[t]),
                same or teacher_forced,
            )
        )
        same = same and ka[t] == kb[t]
    text = None
    if tok is not None:
        from parity.processor import decode_tokens

        text = (decode_tokens(tok, ka), decode_tokens(tok, kb))
    return Row(r, tuple(steps), *(text or (None, None)))


def _cache_slots(
    cfg: PaliGemmaConfig,
    manifest: dict,
    rows: tuple[Row, ...],
    steps: int,
    teacher_forced: bool,
    inputs: str | None = None,
) -> tuple[np.ndarray | None, str | None]:
    """(bool[B, P + N], note): the cache slots that hold the same tokens on both sides: the real prompt (image +
    real text, `core.valid_mask`) and the fed tokens (step t's token sits at slot P + t, the last one is never fed),
    up to a row's first divergence unless teacher-forced. The note is None when the real prompt slots were known."""
    from parity.compare.core import valid_mask

    shape = manifest.get("inputs", {}).get("shapes", {}).get("text")
    if not shape:
        return None, "no inputs recorded: every slot is compared"
    b, length = shape
    p = cfg.num_image_tokens + length
    slots = np.zeros((b, p + steps), bool)
    real, what = valid_mask(cfg, manifest, inputs)
    slots[:, :p] = True if real is None else real
    for r in rows:
        end = min(len(r.steps), steps - 1) if teacher_forced or r.first_divergence is None else r.first_divergence
        slots[r.row, p : p + end] = True
    return slots, (what if real is None else None)


# -- reports ----------------------------------------------------------------------------------------------------
def render(c: GenerationComparison, console=None) -> None:
    """The terminal report: sides, profile, per row the first divergence (near-tie or not), text, a step table."""
    import sys

    from rich.console import Console
    from rich.table import Table

    from parity.compare.report import _bound, _g

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
                _g(s.kl),
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
    from parity.compare.html import log_frame

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
            f"</td><td>{s.near_tie_below:.3e}</td><td>{s.kl:.3e}</td><td>{s.top5:.0%}</td></tr>"
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
