"""The two sides of a comparison: a run of an implementation (`IMPL[:DEVICE][:DTYPE][:PRECISION]` on a checkpoint)
or a capture file recorded earlier (possibly on another machine).

A run side executes in its own process (`python -m parity.compare.worker`), one after the other, writing its capture
to a directory; only the capture files meet in the comparing process, so two 3B float32 models never share memory.
A side's run is a parity.job.Job (sent to the worker as JSON) executed by parity.pipeline.record_run. With teacher
forcing, side B's process also runs each of its units on side A's captured input to that unit (a
parity.backend.BlockBackend's `vit_block` / `llm_block`, and a UnitBackend's `unit` for the norms, projector,
image/text concatenation and head) and writes those outputs to a second capture file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from typing import Any

import numpy as np

from parity import backend, capture_file, errors
from parity.backend import DTYPES, PRECISIONS
from parity.capture_file import Capture  # noqa: F401  (a capture file opened point by point)
from parity.errors import ConfigError, InputsError, ParityError, describe
from parity.job import Generate, Job

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class Side:
    label: str  # "A" or "B"
    spec: str  # as the user wrote it
    capture: str | None = None  # a capture file side
    impl: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    precision: str = "highest"
    ckpt: str | None = None

    @property
    def runs(self) -> bool:
        return self.capture is None

    def describe(self) -> str:
        if not self.runs:
            return f"capture {self.capture}"
        extra = "" if self.precision == "highest" else f", precision {self.precision}"
        return f"{self.impl} {self.device} {self.dtype}{extra} on {self.ckpt}"


def parse_side(label: str, text: str, ckpt: str | None) -> Side:
    """`IMPL[:DEVICE][:DTYPE][:PRECISION]` (e.g. torch, torch:cuda:bfloat16, jax:cpu:float32:default) or the path
    of a capture file (.safetensors)."""
    if text.endswith(".safetensors") or os.path.sep in text or os.path.isfile(text):
        if not os.path.isfile(text):
            raise InputsError(describe(text, what=f"side {label}: capture file not found"))
        return Side(label, text, capture=os.path.abspath(text))
    impl, *rest = text.split(":")
    if impl not in backend.names():
        raise ConfigError(
            f"side {label} {text!r}: unknown implementation {impl!r}; available: "
            f"{', '.join(backend.names())} (or the path of a capture file)"
        )
    dtype = next((t for t in rest if t in DTYPES), "float32")
    precision = next((t for t in rest if t in PRECISIONS), "highest")
    device = ":".join(t for t in rest if t not in DTYPES and t not in PRECISIONS) or "cpu"
    if ckpt is None:
        raise ConfigError(f"side {label} {text!r} runs a model: give the checkpoint (parity compare CKPT ...)")
    return Side(label, text, impl=impl, device=device, dtype=dtype, precision=precision, ckpt=ckpt)


def supports_teacher_forcing(impl: str) -> bool:
    """Whether backend `impl` runs single blocks (a parity.backend.BlockBackend)."""
    return backend.teacher_forcing(impl)


# -- capture files ------------------------------------------------------------------------------------------------
def write_capture(path: str, tensors: dict[str, np.ndarray], manifest: dict[str, Any]) -> None:
    """A capture file (float32 tensors named by point, manifest in the header), written under a temporary name."""
    arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
    capture_file.write_capture(path, arrays, manifest, overwrite=True)


# -- running a side -----------------------------------------------------------------------------------------------
def _job(side: Side, inputs: str, convention: str, config: str | None, **what: Any) -> Job:
    return Job(
        side.ckpt,
        inputs,
        side.impl,
        convention,
        config=config,
        dtype=side.dtype,
        device=side.device,
        precision=side.precision,
        role="side",
        **what,
    )


def job(
    side: Side,
    inputs: str,
    output: str,
    convention: str,
    config: str | None,
    points: list[str] | None,
    teacher_from: str | None = None,
    stream: bool | None = None,
) -> Job:
    """The job of a run side capturing `points` into `output` (and, with `teacher_from`, its blocks on that
    capture's block inputs into OUTPUT.teacher.safetensors); `stream`: block-streamed (Job.stream)."""
    teacher = None if teacher_from is None else output.replace(".safetensors", ".teacher.safetensors")
    return _job(
        side,
        inputs,
        convention,
        config,
        capture=output,
        points=points,
        teacher_from=teacher_from,
        teacher_output=teacher,
        stream=stream,
    )


def generation_job(
    side: Side,
    inputs: str,
    output: str,
    convention: str,
    config: str | None,
    steps: int,
    ignore_eos: bool = True,
    forced_from: str | None = None,
    stream: bool | None = None,
) -> Job:
    """The job of a run side decoding `steps` greedy tokens into the generation file `output` (fed the tokens of
    the generation file `forced_from` when given); `stream`: block-streamed (Job.stream)."""
    record = {"forced_tokens_from": forced_from}
    decode = Generate(steps, ignore_eos=ignore_eos, forced_from=forced_from, record=record, output=output)
    return _job(side, inputs, convention, config, generate=decode, stream=stream)


def run_job(j: Job) -> dict[str, Any]:
    """Run one side's job in this process. Returns {"capture": the capture (or generation) file, "teacher"}."""
    from parity.pipeline import record_run

    rec = record_run(j)
    return {
        "capture": j.capture if j.generate is None else j.generate.output,
        "teacher": j.teacher_output if rec.teacher is not None else None,
    }


def run_side(j: Job, isolate: bool = True) -> dict[str, Any]:
    """Run one side: in a fresh process (isolate) or in this one. ParityErrors keep their class and message."""
    if not isolate:
        return run_job(j)
    from parity.pipeline import own_process

    env = {**os.environ, **(own_process(j) or {})}  # jax float64: x64 from the worker's start
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    p = subprocess.run(
        [sys.executable, "-m", "parity.compare.worker"], input=j.to_json(), text=True, capture_output=True, env=env
    )
    try:
        reply = json.loads(p.stdout.strip().splitlines()[-1]) if p.stdout.strip() else {}
    except json.JSONDecodeError:
        reply = {}
    if p.returncode == 0 and "capture" in reply:
        return reply
    if "error" in reply:
        cls = getattr(errors, reply.get("class", ""), None)
        cls = cls if isinstance(cls, type) and issubclass(cls, ParityError) else ParityError
        raise cls(reply["error"])
    tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
    raise SideFailed(f"side {j.impl} ({j.device}, {j.dtype}) failed with exit status {p.returncode}: {tail}")


class SideFailed(ParityError):
    """A side's process died (out of memory, a crash): nothing to compare."""
