"""Training-step golden bundles: one fine-tuning step of a tiny checkpoint, recorded once, checked on every CI run.

    parity golden record CKPT --train-step --inputs TRAIN --impl transformers -o golden/train/NAME.bundle
    parity golden check golden/train/NAME.bundle --impl jax

A bundle is a directory:
    bundle.json          schema parity.golden.train/1: the checkpoint (path relative to the bundle, sha256), the
                         inputs file and its digest, the conventions (training fields included), the training options
                         (every leaf trainable), the recording implementation, and the leaves whose gradient is
                         exactly zero (below train_step.NEAR_ZERO of the largest leaf norm: rounding noise only)
    inputs.npz           a copy of the training inputs (with mask_loss)
    train.safetensors    train/loss, train/example_loss, train/grad_norm/<leaf> for every other leaf, and the full
                         gradient of every LLM attention leaf (grad/llm/layers/attn/*), float32; the recording run's
                         manifest in the header

`check` runs an implementation's step (backend.TrainPointsBackend.train_points) on the bundle's checkpoint and
inputs under its conventions and compares it with the recording as `compare --train-step` judges (the same
profiles and gradient bounds, side A the bundle); a leaf the bundle says is exactly zero must be below NEAR_ZERO of
the largest norm on the checked side too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from parity import backend as backends
from parity import spec
from parity.capture_file import read_capture, write_capture
from parity.compare.train_step import NEAR_ZERO, TrainComparison, _compare
from parity.conventions import Conventions
from parity.errors import InputsError, OutputError, describe
from parity.training import TrainOptions

SCHEMA = "parity.golden.train/1"
MANIFEST = "bundle.json"
RECORD = "train.safetensors"
OPTIONS = TrainOptions(trainable=("all",))
FULL = "grad/llm/layers/attn/"  # the leaves whose whole gradient a bundle keeps


def is_train_bundle(path: str) -> bool:
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            return json.load(f).get("schema") == SCHEMA
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def norm_point(key: str) -> str:
    return f"train/grad_norm/{key}"


def bundle_points(points: dict[str, np.ndarray], config) -> tuple[dict[str, np.ndarray], list[str]]:
    """(what a bundle keeps of a step's points, the leaves with an exactly-zero gradient) from train_points."""
    keys = [e.key for e in spec.entries(config)]
    norms = {k: float(np.sqrt(np.sum(np.square(points[f"grad/{k}"], dtype=np.float64)))) for k in keys}
    top = max(norms.values())
    zero = [k for k in keys if norms[k] < NEAR_ZERO * top]
    out = {k: np.asarray(points[k], np.float32) for k in ("train/loss", "train/example_loss")}
    out.update({norm_point(k): np.asarray(norms[k], np.float32) for k in keys if k not in zero})
    out.update(
        {k: np.asarray(v, np.float32) for k, v in points.items() if k.startswith(FULL) and "/layer" not in k[-8:]}
    )
    return out, zero


def _run(ckpt, inputs, impl, convention, dtype, device, precision, config, progress):
    """(the bundle's points of one step of `impl`, its zero leaves, the run's manifest, the config)."""
    from parity.job import Job
    from parity.pipeline import load

    if not backends.train_points(impl):
        raise InputsError(f"--impl {impl}: no train_points (backend.TrainPointsBackend); a training golden runs one")
    say = progress or (lambda msg: None)
    job = Job(ckpt, inputs, impl, convention, config=config, dtype=dtype, device=device, precision=precision)
    loaded = load(job)
    if "mask_loss" not in loaded.inputs:
        raise InputsError(f"{inputs}: no 'mask_loss': not a training batch; make one with `parity inputs --suffix`")
    say(f"training step: {impl}")
    got = loaded.backend.train_points(loaded.model, loaded.inputs, OPTIONS)
    points, zero = bundle_points(got, loaded.config)
    return points, zero, {**loaded.manifest, "train": OPTIONS.to_dict()}, loaded.config, loaded.inputs


def record(
    ckpt: str,
    inputs: str,
    output: str,
    impl: str = "transformers",
    convention: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    precision: str = "highest",
    config: str | None = None,
    update: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Record a training-step bundle at `output` (refused if it exists, unless `update`). Returns its manifest."""
    from converters.atomic import atomic_output
    from parity.inputs import inputs_sha256, load_inputs

    output = os.path.abspath(output)
    if os.path.exists(output) and not update:
        raise OutputError(describe(output, what="exists; pass --update to re-record it"))
    convention = convention or ("transformers" if impl == "transformers" else "big_vision")
    points, zero, manifest, cfg, batch = _run(
        ckpt, inputs, impl, convention, dtype, device, precision, config, progress
    )
    ext = ".safetensors" if inputs.endswith(".safetensors") else ".npz"
    bundle = {
        "schema": SCHEMA,
        "config": cfg.name,
        "checkpoint": {
            "path": os.path.relpath(os.path.abspath(ckpt), output).replace(os.sep, "/"),
            "sha256": manifest["checkpoint"]["sha256"],
        },
        "inputs": "inputs" + ext,
        "inputs_sha256": inputs_sha256(load_inputs(inputs, cfg)),
        "conventions": manifest["conventions"],
        "convention": convention,
        "train": OPTIONS.to_dict(),
        "impl": impl,
        "zero_gradient_leaves": zero,
        "recorded": manifest["created"],
    }
    with tempfile.TemporaryDirectory(prefix="parity-golden-train-") as scratch:
        write_capture(os.path.join(scratch, RECORD), points, {**manifest, "points": list(points)})
        with atomic_output(output, True, True) as tmp:
            shutil.copyfile(inputs, os.path.join(tmp, bundle["inputs"]))
            shutil.copyfile(os.path.join(scratch, RECORD), os.path.join(tmp, RECORD))
            with open(os.path.join(tmp, MANIFEST), "w") as f:
                json.dump(bundle, f, indent=1)
                f.write("\n")
    return bundle


@dataclasses.dataclass(frozen=True)
class TrainGoldenCheck:
    bundle: str
    comparison: TrainComparison
    zero_leaves: dict[str, float]  # leaf -> its norm / the largest norm on the checked side

    def __bool__(self) -> bool:
        return bool(self.comparison) and all(v < NEAR_ZERO for v in self.zero_leaves.values())

    @property
    def exit_code(self) -> int:
        return 0 if self else 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA.replace("/", ".check/"),
            "passed": bool(self),
            "bundle": self.bundle,
            "zero_gradient_leaves": {
                k: {"relative_norm": v, "passed": v < NEAR_ZERO} for k, v in self.zero_leaves.items()
            },
            "comparison": self.comparison.to_dict(),
        }


def check(
    bundle: str,
    impl: str = "torch",
    checkpoint: str | None = None,
    profile: str | None = None,
    policy: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    precision: str = "highest",
    progress: Callable[[str], None] | None = None,
) -> TrainGoldenCheck:
    """Run `impl`'s step on a training bundle's checkpoint and inputs and compare it with the recording."""
    from parity.compare.sides import Side

    mpath = os.path.join(bundle, MANIFEST)
    if not is_train_bundle(bundle):
        raise InputsError(describe(mpath, "schema", SCHEMA, "another schema or no bundle.json"))
    with open(mpath) as f:
        m = json.load(f)
    ckpt = checkpoint or os.path.normpath(os.path.join(bundle, *m["checkpoint"]["path"].split("/")))
    conv = Conventions.from_dict(m["conventions"])
    inputs = os.path.join(bundle, m["inputs"])
    rec, ma = read_capture(os.path.join(bundle, RECORD))
    got, zero, mb, cfg, batch = _run(ckpt, inputs, impl, conv, dtype, device, precision, m["config"], progress)
    top = max(float(v) for k, v in got.items() if k.startswith("train/grad_norm/"))
    sides = {"A": Side("A", f"bundle {bundle}", capture=bundle), "B": Side("B", impl, impl=impl, ckpt=ckpt)}
    c = _compare(rec, got, None, list(rec), ma, mb, cfg, batch, sides, profile, policy, OPTIONS, [])
    zero_rel = {k: _zero_norm(got, k, top) for k in m["zero_gradient_leaves"]}
    return TrainGoldenCheck(os.path.abspath(bundle), c, zero_rel)


def _zero_norm(got: dict[str, np.ndarray], key: str, top: float) -> float:
    """A leaf's gradient norm on the checked side over the largest norm (0 when the side counts it zero too)."""
    return float(got[norm_point(key)]) / top if norm_point(key) in got else 0.0
