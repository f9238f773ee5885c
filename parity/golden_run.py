"""Running one golden expectation (parity.golden's record and check): every capture point of a run and, with
`steps`, its greedy decoding (teacher-forced on a bundle's tokens when checking), resident or block-streamed."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any


def run_expectation(
    ckpt: str,
    inputs: str,
    impl: str,
    convention,
    out_dir: str,
    name: str,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    precision: str = "highest",
    config: str | None = None,
    steps: int | None = None,
    forced_from: str | None = None,
    progress: Callable[[str], None] | None = None,
    stream: bool | None = None,
) -> tuple[str, str | None, dict[str, Any]]:
    """Capture every point of one run (and decode `steps` greedy tokens, fed the tokens of the generation file
    `forced_from` when given) into NAME.capture.safetensors / NAME.generation.safetensors in out_dir.
    `stream`: block-streamed (Job.stream: True forces it; None: when a resident run would not fit).
    Returns (capture, generation, manifest)."""
    from parity.job import Generate, Job
    from parity.pipeline import record_run

    say = progress or (lambda msg: None)
    say(f"loading {os.path.basename(ckpt)} ({impl})")
    stages = {"forward": "forward pass", "decoding": f"decoding {steps} steps"}
    seen: set[str] = set()

    def stage(name: str, done, total) -> None:  # the stages of the run as status lines, each once
        if name in stages and name not in seen:
            seen.add(name)
            say(stages[name])

    cap = os.path.join(out_dir, f"{name}.capture.safetensors")
    gen = os.path.join(out_dir, f"{name}.generation.safetensors") if steps else None
    decode = None
    if steps:
        record = {"forced_tokens": forced_from is not None}
        decode = Generate(steps, forced_from=forced_from, record=record, output=gen)
    job = Job(ckpt, inputs, impl, convention, config=config, dtype=dtype, device=device, precision=precision)
    job = dataclasses.replace(job, stream=stream)
    rec = record_run(dataclasses.replace(job, capture=cap, generate=decode), stage if progress else None)
    return cap, gen, rec.manifest
