"""The two sides of a comparison: a run of an implementation (`IMPL[:DEVICE][:DTYPE][:PRECISION]` on a checkpoint)
or a capture file recorded earlier (possibly on another machine).

A run side executes in its own process (`python -m parity.compare.worker`), one after the other, writing its capture
to a directory; only the capture files meet in the comparing process, so two 3B float32 models never share memory.
With teacher forcing, side B's process also runs each of its ViT and LLM blocks on side A's captured input to that
block (the implementations' `vit_block` / `llm_block`) and writes those outputs to a second capture file.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np

from converters import safetensors_io
from parity import errors
from parity import points as pts
from parity.errors import ConfigError, InputsError, ParityError, describe
from parity.estimate import Work

DTYPES = ("float32", "bfloat16", "float16")
PRECISIONS = ("highest", "high", "default")
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
    from parity.run import IMPLS

    if text.endswith(".safetensors") or os.path.sep in text or os.path.isfile(text):
        if not os.path.isfile(text):
            raise InputsError(describe(text, what=f"side {label}: capture file not found"))
        return Side(label, text, capture=os.path.abspath(text))
    impl, *rest = text.split(":")
    if impl not in IMPLS:
        raise ConfigError(
            f"side {label} {text!r}: unknown implementation {impl!r}; available: "
            f"{', '.join(IMPLS)} (or the path of a capture file)"
        )
    dtype = next((t for t in rest if t in DTYPES), "float32")
    precision = next((t for t in rest if t in PRECISIONS), "highest")
    device = ":".join(t for t in rest if t not in DTYPES and t not in PRECISIONS) or "cpu"
    if ckpt is None:
        raise ConfigError(f"side {label} {text!r} runs a model: give the checkpoint (parity compare CKPT ...)")
    return Side(label, text, impl=impl, device=device, dtype=dtype, precision=precision, ckpt=ckpt)


def supports_teacher_forcing(impl: str) -> bool:
    from parity.run import IMPLS

    api = importlib.import_module(IMPLS[impl])
    return hasattr(api, "vit_block") and hasattr(api, "llm_block")


# -- capture files ------------------------------------------------------------------------------------------------
def write_capture(path: str, tensors: dict[str, np.ndarray], manifest: dict[str, Any]) -> None:
    """A capture file (float32 tensors named by point, manifest in the header), written under a temporary name."""
    from parity import run

    run.write_capture(
        path, {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, manifest, overwrite=True
    )


class Capture:
    """A capture file opened for reading one point at a time."""

    def __init__(self, path: str):
        try:
            self.reader = safetensors_io.SafetensorsReader.open(path)
        except (ParityError, OSError, ValueError) as e:
            raise InputsError(describe(path, what=f"not a capture file: {e}")) from None
        self.path = path
        raw = self.reader.metadata.get("parity_manifest")
        if raw is None:
            self.reader.close()
            raise InputsError(describe(path, "parity_manifest", "a capture manifest in the header", "none"))
        try:
            from parity.run import capture_manifest

            self.manifest = capture_manifest(path, raw)
        except ParityError as e:
            self.reader.close()
            raise InputsError(str(e)) from None
        self.points = set(self.reader.keys())

    def read(self, point: str) -> np.ndarray:
        return self.reader.read(point)

    def close(self) -> None:
        self.reader.close()


# -- running a side -----------------------------------------------------------------------------------------------
def job(
    side: Side,
    inputs: str,
    output: str,
    convention: str,
    config: str | None,
    points: list[str] | None,
    teacher_from: str | None = None,
) -> dict[str, Any]:
    return {
        "impl": side.impl,
        "ckpt": side.ckpt,
        "inputs": inputs,
        "dtype": side.dtype,
        "device": side.device,
        "precision": side.precision,
        "convention": convention,
        "config": config,
        "points": points,
        "output": output,
        "teacher_from": teacher_from,
        "teacher_output": None if teacher_from is None else output.replace(".safetensors", ".teacher.safetensors"),
    }


def run_job(j: dict[str, Any]) -> dict[str, Any]:
    """Capture the points of one side (and, with `teacher_from`, its blocks on that capture's block inputs)."""
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
        work=Work("side", points=j["points"], teacher=bool(j["teacher_from"])),
    )
    wanted = pts.select(pts.forward_points(cfg), j["points"])
    t0 = time.perf_counter()
    out = api.forward(model, batch, wanted)
    manifest.update(points=list(out), seconds=round(time.perf_counter() - t0, 3))
    if hasattr(api, "side_notes"):
        manifest["notes"] = api.side_notes(model)
    write_capture(j["output"], out, manifest)
    result = {"capture": j["output"], "teacher": None}
    if j["teacher_from"]:
        teacher = teacher_forced_blocks(api, model, cfg, batch, j["teacher_from"])
        write_capture(
            j["teacher_output"],
            teacher,
            {**manifest, "points": list(teacher), "teacher_forced_from": j["teacher_from"]},
        )
        result["teacher"] = j["teacher_output"]
    return result


def teacher_forced_blocks(api, model, cfg, batch, reference: str) -> dict[str, np.ndarray]:
    """Every block of `model` run on the reference capture's input to that block."""
    ref = Capture(reference)
    out: dict[str, np.ndarray] = {}
    try:
        for i in range(cfg.vision.depth):
            src = pts.IMG_POS_EMBED if i == 0 else pts.img_block_out(i - 1)
            if src in ref.points:
                out.update(api.vit_block(model, i, ref.read(src)))
        for i in range(cfg.text.depth):
            src = pts.LLM_INPUT if i == 0 else pts.llm_block_out(i - 1)
            if src in ref.points:
                out.update(api.llm_block(model, i, ref.read(src), batch))
    finally:
        ref.close()
    return out


def run_side(j: dict[str, Any], isolate: bool = True) -> dict[str, Any]:
    """Run one side: in a fresh process (isolate) or in this one. ParityErrors keep their class and message."""
    if not isolate:
        return run_job(j)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    p = subprocess.run(
        [sys.executable, "-m", "parity.compare.worker"], input=json.dumps(j), text=True, capture_output=True, env=env
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
    raise SideFailed(f"side {j['impl']} ({j['device']}, {j['dtype']}) failed with exit status {p.returncode}: {tail}")


class SideFailed(ParityError):
    """A side's process died (out of memory, a crash): nothing to compare."""
