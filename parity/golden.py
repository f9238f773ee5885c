"""Golden bundles: a recorded run of a checkpoint, kept in the repository and checked on every CI run.

    parity golden record CKPT --inputs IN --impl transformers --generate 8 -o golden/NAME.bundle
    parity golden check golden/NAME.bundle --impl torch

A bundle is a directory:
    bundle.json                       schema parity.golden/1: the checkpoint (path relative to the bundle, sha256),
                                      the inputs file, the conventions, the number of generated steps, and one
                                      expectation per (device class, precision profile)
    inputs.npz (or .safetensors)      a copy of the inputs the expectations ran on
    DEVICE-PROFILE.capture.safetensors     every capture point (float32) with the run's manifest in its header
                                           (config, conventions, impl, dtype, device, precision, library versions,
                                           sha256 of checkpoint and inputs)
    DEVICE-PROFILE.generation.safetensors  greedy tokens int32[B, N], step logits float32[B, N, V] and the
                                           llm/layerNN/{k,v}_cache points at the end of decoding

`check` runs an implementation on the bundle's inputs under the bundle's conventions and compares it with the
expectation of its device class (cpu / cuda / tpu) and precision profile (fp32 / tf32 / f16 / bf16), falling back to
the closest one (same device class first, then the nearest profile) and saying so. Side A of the comparison is the
bundle. Its decoding is fed the bundle's tokens (teacher-forced: every step stays comparable, and a step where the
implementation would pick another token is still reported), so the step logits and the caches are compared at
every step. The run is resident, or block-streamed (`--stream`, or when a resident one would not fit:
parity.stream, parity.stream_generate).
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

from parity import points as pts
from parity.capture_file import capture_header, decoding_steps
from parity.compare import tolerances as tol
from parity.compare.core import Comparison, compare_captures
from parity.compare.generation import GenerationComparison, compare_generation_files
from parity.config import PaliGemmaConfig
from parity.conventions import forward_fields
from parity.errors import CheckpointError, ConfigError, InputsError, OutputError, describe
from parity.golden_report import render, render_record  # noqa: F401  (the terminal reports, as before)
from parity.golden_run import run_expectation

SCHEMA = "parity.golden/1"
CHECK_SCHEMA = "parity.golden.check/1"
MANIFEST = "bundle.json"
DEVICE_CLASSES = ("cpu", "cuda", "tpu")


def device_class(device: str) -> str:
    """cpu / cuda / tpu of a device string or manifest description ("cuda:0 (NVIDIA H200)", jax "gpu:0")."""
    d = device.lower()
    if d.startswith(("cuda", "gpu")) or "gpu" in d.split(" ")[0]:
        return "cuda"
    return "tpu" if d.startswith("tpu") else "cpu"


@dataclasses.dataclass(frozen=True)
class Expectation:
    device_class: str
    profile: str
    capture: str  # file names inside the bundle
    generation: str | None
    impl: str
    recorded: str

    @property
    def key(self) -> tuple[str, str]:
        return self.device_class, self.profile


@dataclasses.dataclass(frozen=True)
class Bundle:
    path: str
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: str) -> Bundle:
        mpath = os.path.join(path, MANIFEST)
        if not os.path.isdir(path) or not os.path.isfile(mpath):
            raise InputsError(describe(path, what=f"not a golden bundle (a directory holding {MANIFEST})"))
        try:
            with open(mpath) as f:
                m = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise InputsError(describe(mpath, what=f"unreadable bundle manifest: {e}")) from None
        if not isinstance(m, dict) or m.get("schema") != SCHEMA:
            raise InputsError(describe(mpath, "schema", SCHEMA, m.get("schema") if isinstance(m, dict) else m))
        return cls(os.path.abspath(path), m)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def inputs(self) -> str:
        return self.file(self.manifest["inputs"])

    @property
    def checkpoint(self) -> str:
        """The recorded checkpoint, relative to the bundle (found from any clone of the repository)."""
        return os.path.normpath(os.path.join(self.path, *self.manifest["checkpoint"]["path"].split("/")))

    @property
    def expectations(self) -> list[Expectation]:
        return [Expectation(**e) for e in self.manifest["expectations"]]

    def closest(self, dev_class: str, profile: str) -> tuple[Expectation, str | None]:
        """The expectation for (dev_class, profile), else the closest one: same device class and the nearest
        profile, then the same profile on another class, then the nearest overall. Returns (it, fallback note)."""
        exps = self.expectations
        if not exps:
            raise InputsError(describe(self.file(MANIFEST), "expectations", "at least one", "none"))

        def distance(e: Expectation) -> tuple[int, int]:
            return (e.device_class != dev_class, abs(tol.ORDER.index(e.profile) - tol.ORDER.index(profile)))

        best = min(exps, key=lambda e: (distance(e), DEVICE_CLASSES.index(e.device_class)))
        note = None
        if best.key != (dev_class, profile):
            note = (
                f"no expectation for {dev_class}/{profile} in this bundle; using the closest, "
                f"{best.device_class}/{best.profile}"
            )
        return best, note


# -- record -----------------------------------------------------------------------------------------------------
def record(
    ckpt: str,
    inputs: str,
    output: str,
    impl: str = "torch",
    convention: str | None = None,
    steps: int | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    precision: str = "highest",
    config: str | None = None,
    update: bool = False,
    progress: Callable[[str], None] | None = None,
    runner: Callable[[str], tuple[str, str | None, dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Record (or with `update`, add / replace) the expectation of this run's device class and profile in the
    bundle at `output`. Returns a report: the bundle manifest, the expectation written and, on update, what changed
    against the bundle's previous expectation.

    `runner(scratch_dir)` replaces the run of `impl` (golden/record_goldens.py's keras-hub recorder): it writes the
    capture and generation files itself, as `run_expectation` does, and returns (capture, generation, manifest); a
    capture may then hold a subset of the points, which is what `check` compares."""
    from converters.atomic import atomic_output

    output = os.path.abspath(output)
    old = None
    if os.path.lexists(output):
        if not update:
            raise OutputError(
                describe(
                    output, what="golden bundle exists; pass --update to re-record it (the report says what changed)"
                )
            )
        old = Bundle.open(output)
    if not os.path.isdir(os.path.dirname(output)):
        raise OutputError(describe(output, what=f"output directory {os.path.dirname(output)} does not exist"))
    if not os.path.isfile(inputs):
        raise InputsError(describe(inputs, what="inputs file not found"))
    if steps is not None and steps < 1:
        raise ConfigError(f"--generate must be >= 1, got {steps}")
    convention = convention or ("transformers" if impl == "transformers" else "big_vision")
    suffix = ".safetensors" if inputs.endswith(".safetensors") else ".npz"
    with tempfile.TemporaryDirectory(prefix="parity-golden-") as scratch:
        if runner is not None:
            cap, gen, manifest = runner(scratch)
        else:
            cap, gen, manifest = run_expectation(
                ckpt,
                inputs,
                impl,
                convention,
                scratch,
                "run",
                dtype=dtype,
                device=device,
                precision=precision,
                config=config,
                steps=steps,
                progress=progress,
            )
        exp = Expectation(
            device_class(manifest["device"]), tol.precision_class(manifest), "", None, impl, manifest["created"]
        )
        name = f"{exp.device_class}-{exp.profile}"
        exp = dataclasses.replace(
            exp, capture=f"{name}.capture.safetensors", generation=f"{name}.generation.safetensors" if gen else None
        )
        rel = os.path.relpath(os.path.abspath(ckpt), output).replace(os.sep, "/")
        bm = {
            "schema": SCHEMA,
            "config": manifest["config"]["name"],
            "checkpoint": {"path": rel, "sha256": manifest["checkpoint"]["sha256"]},
            "inputs": "inputs" + suffix,
            "inputs_sha256": manifest["inputs"]["sha256"],
            "conventions": manifest["conventions"],
            "convention": convention if isinstance(convention, str) else None,
            "generate": steps,
            "expectations": [],
        }
        changes, replacing = None, old is not None
        same = {"conventions": forward_fields}  # training-only options aside (records made before they existed)
        if old is not None and any(
            same.get(k, lambda v: v)(old.manifest.get(k)) != same.get(k, lambda v: v)(bm[k])
            for k in ("inputs_sha256", "config", "conventions")
        ):
            changes = {
                "note": "the old bundle was recorded on other inputs, another model or other conventions: "
                "replaced whole"
            }
            old = None
        elif old is not None:
            changes = _changes(old, cap, gen, exp, inputs)
            # the other device classes / profiles stay
            bm["expectations"] = [dataclasses.asdict(e) for e in old.expectations if e.key != exp.key]
        bm["expectations"].append(dataclasses.asdict(exp))
        with atomic_output(output, True, replacing) as tmp:
            if old is not None:
                for e in old.expectations:
                    if e.key != exp.key:
                        for f in (e.capture, e.generation):
                            if f:
                                shutil.copy2(old.file(f), os.path.join(tmp, f))
            shutil.copyfile(inputs, os.path.join(tmp, bm["inputs"]))
            shutil.copyfile(cap, os.path.join(tmp, exp.capture))
            if gen:
                shutil.copyfile(gen, os.path.join(tmp, exp.generation))
            with open(os.path.join(tmp, MANIFEST), "w") as f:
                json.dump(bm, f, indent=1)
                f.write("\n")
    return {"bundle": output, "manifest": bm, "expectation": dataclasses.asdict(exp), "changes": changes}


def _changes(old: Bundle, cap: str, gen: str | None, exp: Expectation, inputs: str) -> dict[str, Any]:
    """What the new expectation changes against the old bundle's (same key, else the closest): manifest fields,
    every point whose values moved (with its max abs / max rel), the rows whose tokens changed."""
    prev, note = old.closest(exp.device_class, exp.profile)
    c = compare_captures(old.file(prev.capture), cap, inputs=inputs, allow_convention_mismatch=True)
    moved = [
        {"point": r.point, "max_abs": r.stats.max_abs, "max_rel": r.stats.max_rel}
        for r in c.records
        if r.stats is not None and r.stats.max_abs > 0
    ]
    out: dict[str, Any] = {
        "against": f"{prev.device_class}/{prev.profile}",
        "note": note,
        "manifest": c.differences,
        "points_changed": moved,
        "points_unchanged": sum(1 for r in c.records if r.stats is not None and not r.stats.max_abs),
    }
    if gen and prev.generation:
        from parity.capture_file import read_capture

        ta, _ = read_capture(old.file(prev.generation))
        tb, _ = read_capture(gen)
        if ta["tokens"].shape == tb["tokens"].shape:
            out["tokens_changed_rows"] = [int(r) for r in np.flatnonzero((ta["tokens"] != tb["tokens"]).any(1))]
        else:
            out["tokens_changed_rows"] = f"steps {ta['tokens'].shape[1]} -> {tb['tokens'].shape[1]}"
        out["step_logits_max_abs_change"] = (
            float(np.abs(ta["logits"] - tb["logits"]).max()) if ta["logits"].shape == tb["logits"].shape else None
        )
    return out


# -- check ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GoldenCheck:
    """Truthy when the run matches the bundle's expectation (every point, and the decoding)."""

    bundle: str
    expectation: Expectation
    checkpoint: dict[str, Any]
    notes: tuple[str, ...]
    capture: Comparison
    generation: GenerationComparison | None

    def __bool__(self) -> bool:
        return bool(self.capture) and (self.generation is None or bool(self.generation))

    @property
    def exit_code(self) -> int:
        return 0 if self else 1

    @property
    def first_divergence(self) -> str | None:
        return self.capture.first_divergence or (self.generation.first_divergence if self.generation else None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": CHECK_SCHEMA,
            "passed": bool(self),
            "first_divergence": self.first_divergence,
            "bundle": self.bundle,
            "expectation": dataclasses.asdict(self.expectation),
            "checkpoint": self.checkpoint,
            "notes": list(self.notes),
            "capture": self.capture.to_dict(),
            "generation": self.generation.to_dict() if self.generation else None,
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
    stream: bool | None = None,
) -> GoldenCheck:
    """Run `impl` on the bundle's inputs (its recorded checkpoint, sha256-verified, unless `checkpoint` is given)
    and compare it with the closest expectation (see the module docstring). `stream`: block-streamed (forward and
    decoding; None: when a resident run would not fit)."""
    from parity import backend
    from parity.capture_file import file_sha256
    from parity.pipeline import conventions

    b = Bundle.open(bundle)
    dev_class = device_class(backend.get(impl).resolve_device(device))
    run_profile = tol.precision_class({"dtype": dtype, "precision": precision, "device": dev_class})
    exp, note = b.closest(dev_class, run_profile)
    notes = [note] if note else []
    if checkpoint is None:
        ckpt = b.checkpoint
        if not os.path.exists(ckpt):
            raise CheckpointError(
                describe(
                    ckpt,
                    what=f"the bundle's checkpoint ({b.manifest['checkpoint']['path']} "
                    f"relative to the bundle) is missing; pass --checkpoint",
                )
            )
        found = file_sha256(ckpt)
        if found != b.manifest["checkpoint"]["sha256"]:
            raise CheckpointError(
                describe(
                    ckpt,
                    "sha256",
                    b.manifest["checkpoint"]["sha256"],
                    found,
                    "not the checkpoint this bundle was recorded from; pass --checkpoint "
                    "to check another one against it",
                )
            )
        ck = {"path": ckpt, "sha256_verified": True}
    else:
        ckpt, ck = checkpoint, {"path": os.path.abspath(checkpoint), "sha256_verified": False}
    conv = conventions(_conventions(b.manifest["conventions"]))
    forced = b.file(exp.generation) if exp.generation else None
    with tempfile.TemporaryDirectory(prefix="parity-golden-check-") as scratch:
        cap, gen, _ = run_expectation(
            ckpt,
            b.inputs,
            impl,
            conv,
            scratch,
            "run",
            dtype=dtype,
            device=device,
            precision=precision,
            config=None,
            steps=decoding_steps(forced) if forced else None,
            forced_from=forced,
            progress=progress,
            stream=stream,
        )
        if progress:
            progress("comparing")
        held, held_manifest = capture_header(b.file(exp.capture))
        # Only an outside reference that exposes some points (keras-hub) may hold fewer: a torch / jax /
        # transformers expectation short of a point is a damaged bundle (exit 2), not a pass on fewer points.
        full = pts.forward_points(PaliGemmaConfig.from_dict(held_manifest["config"]))
        short = [p for p in full if p not in held]
        if short and exp.impl not in PARTIAL_REFERENCES:
            raise InputsError(
                describe(
                    b.file(exp.capture),
                    short[0],
                    f"all {len(full)} capture points of a {exp.impl} expectation",
                    f"{len(full) - len(short)} ({len(short)} absent)",
                )
            )
        partial = held if short else None
        if partial:  # an outside reference that exposes some points only (keras-hub): those are compared
            notes.append(
                f"the expectation holds {len(partial)} of the {len(full)} "
                f"capture points ({exp.impl} exposes no others); those are compared"
            )
        c = compare_captures(b.file(exp.capture), cap, inputs=b.inputs, profile=profile, policy=policy, points=partial)
        c = dataclasses.replace(
            c,
            sides={
                "A": {**c.sides["A"], "spec": f"golden {b.path} ({exp.device_class}/{exp.profile}, {exp.impl})"},
                "B": {**c.sides["B"], "spec": f"{impl} {device} {dtype}", "kind": "run"},
            },
        )
        g = None
        if gen:
            g = compare_generation_files(b.file(exp.generation), gen, None, True, profile, policy, inputs=b.inputs)
            g = dataclasses.replace(
                g,
                sides={
                    "A": {**g.sides["A"], "spec": c.sides["A"]["spec"]},
                    "B": {**g.sides["B"], "spec": c.sides["B"]["spec"], "kind": "run"},
                },
            )
    return GoldenCheck(b.path, exp, ck, tuple(notes), c, g)


PARTIAL_REFERENCES = ("keras_hub",)


def _conventions(d: dict[str, Any]):
    from parity.conventions import Conventions

    return Conventions.from_dict(d)
