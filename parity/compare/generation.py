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

Modules: this one compares (a side runs through compare.sides.generation_job and the pipeline);
generation_records.py holds the records (steps, rows, the comparison), generation_report.py and generation_html.py
the terminal and HTML reports. The statistics are stats.py's (kl_rows, top_counts, point_stats), the point records
core.py's.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from parity import points as pts
from parity.compare import tolerances as tol
from parity.compare.core import COMPARED, PointRecord, point_record, resolve_sides, run_sides
from parity.compare.generation_html import render_html, write_html
from parity.compare.generation_records import SCHEMA, GenerationComparison, Row, Step, build_row, margins
from parity.compare.generation_report import render
from parity.compare.manifests import check_manifests, manifest_differences, valid_mask
from parity.compare.sides import Side, generation_job, run_side
from parity.compare.stats import point_stats
from parity.config import PaliGemmaConfig
from parity.errors import ConfigError, InputsError, describe
from parity.job import Job

__all__ = [  # the public names of `parity compare --generate`, wherever they live
    "SCHEMA",
    "STEP_LOGITS",
    "GenerationComparison",
    "Row",
    "Step",
    "compare_generation",
    "compare_generation_files",
    "generation_job",
    "margins",
    "render",
    "render_html",
    "write_html",
]
STEP_LOGITS = "decode/logits"  # the record of the step logits (judged by the profile's `logits` rule)


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
    stream: bool | None = None,
) -> GenerationComparison:
    """Decode `steps` tokens greedily on both sides (run sides, or generation files) and compare them. `stream`:
    the run sides block-streamed (Job.stream; None: each side when it would not fit resident)."""
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

        def side_job(side: Side, a_path: str | None) -> Job:
            out = os.path.join(tmp, f"{side.label}.generation.safetensors")
            forced = a_path if teacher_forced else None
            return generation_job(side, inputs, out, convention, config, steps, ignore_eos, forced, stream)

        paths = run_sides(
            side_a, side_b, side_job, lambda j: run_side(j, isolate), lambda msg: say(f"{msg}, {steps} greedy steps")
        )
        say("comparing")
        return compare_generation_files(
            paths["A"][0],
            paths["B"][0],
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
    rows = tuple(build_row(r, ta, tb, bound, teacher_forced, tok) for r in range(ta["tokens"].shape[0]))
    comparable = np.array([[s.comparable for s in r.steps] for r in rows], bool)
    stats = point_stats(ta["logits"], tb["logits"], tol.compared_dtype(ma, mb), comparable, True)
    judged = tols.judge(pts.LOGITS, stats)
    records = [PointRecord(STEP_LOGITS, COMPARED, stats, dataclasses.replace(judged, point=STEP_LOGITS))]
    steps = ma.get("sampling", {}).get("max_new_tokens", n)
    slots, slots_what = _cache_slots(cfg, ma, rows, steps, teacher_forced, inputs)
    if slots_what:
        notes.append(f"KV cache prompt slots: {slots_what}")
    for name in pts.cache_points(cfg):
        a, b = (functools.partial(t.__getitem__, name) if name in t else None for t in (ta, tb))
        r, _ = point_record(name, a, b, tol.compared_dtype(ma, mb), slots)
        if r is not None:
            records.append(r if r.stats is None else dataclasses.replace(r, judgement=tols.judge(name, r.stats)))
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
