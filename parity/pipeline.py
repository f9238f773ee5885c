"""Running one side: `record_run(job)` loads the checkpoint and inputs, builds the job's backend model, and records
what the job asks for, each file with the run's manifest in its header. `parity capture` / `generate`
(parity.run), a compare side's worker process (parity.compare.worker) and golden bundles (parity.golden) all run
through it.

Every option is checked before the checkpoint is read, so a typo costs nothing.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from converters import hub
from converters.checkpoint import open_checkpoint
from converters.dtypes import FLOAT_DTYPES
from parity import backend as backends
from parity import estimate, monitor, spec, stream, training
from parity import points as pts
from parity.backend import DTYPES
from parity.capture_file import Capture, capture_header, file_sha256, library_versions, read_capture, write_capture
from parity.config import PaliGemmaConfig
from parity.conventions import Conventions, get_conventions, with_settings
from parity.errors import ConfigError, UsageError
from parity.inputs import inputs_sha256, load_inputs
from parity.job import Job

# progress(stage, done, total): stage "loading" (bytes), "building", "hashing" (sha256 of the files), "forward"
# (blocks), "decoding" (tokens), "training" (SGD steps), "writing"; done/total None when unknown.
Progress = Callable[[str, float | None, float | None], None]


# -- options, checked before any file is read ---------------------------------------------------------------------
def conventions(convention: str | Conventions, settings: list[str] | tuple[str, ...] = ()) -> Conventions:
    """A preset (or Conventions) with `--set NAME=VALUE` overrides applied in order."""
    try:
        base = convention if isinstance(convention, Conventions) else get_conventions(convention)
        return with_settings(base, settings)
    except KeyError as e:
        raise ConfigError(str(e.args[0])) from None
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_dtypes(dtype: str, compute_dtype: str | None) -> str:
    """The dtype the model computes in: `compute_dtype`, else `dtype` (the parameters' values)."""
    for flag, d in (("--dtype", dtype), ("--compute-dtype", compute_dtype)):
        if d is not None and d not in DTYPES:
            raise UsageError(f"{flag} {d!r}; allowed: {', '.join(DTYPES)}")
    return compute_dtype or dtype


@dataclasses.dataclass
class Loaded:
    """A built model with everything a run records about it."""

    backend: backends.Backend
    model: Any
    config: PaliGemmaConfig
    inputs: dict[str, np.ndarray]
    manifest: dict[str, Any]


@dataclasses.dataclass
class Record:
    """What `record_run` did: the run's manifest, the manifests of the files it wrote (or would have written) and
    the decoding's result (backend.generate's dict)."""

    loaded: Loaded
    capture: dict[str, Any] | None = None
    teacher: dict[str, Any] | None = None
    generation: dict[str, Any] | None = None
    generated: dict[str, Any] | None = None

    @property
    def manifest(self) -> dict[str, Any]:
        return self.loaded.manifest


def work(job: Job, cfg: PaliGemmaConfig | None = None) -> estimate.Work:
    """What the job does after loading, as the memory estimate counts it (a training step needs `cfg`)."""
    g = job.generate
    if job.train is not None and cfg is not None:
        sizes = {e.key: int(np.prod(e.shape)) for e in spec.entries(cfg)}
        trained = sum(sizes[k] for k in training.trainable_leaves(job.train, sizes))
        half = job.train.frozen_dtype == "float16"
        return estimate.Work("train", trainable=trained, frozen_copy=(sum(sizes.values()) - trained) * half)
    if job.capture is not None and g is not None:
        return estimate.Work("golden", new_tokens=g.steps)
    if job.capture is not None:
        kind = "side" if job.role == "side" else "capture"
        return estimate.Work(kind, points=job.points, teacher=bool(job.teacher_from))
    if g is not None:
        return estimate.Work("generate", new_tokens=g.steps, step_logits=g.logits, cache_points=g.caches)
    return estimate.Work()


def load(
    job: Job,
    progress: Progress | None = None,
    warn: Callable[[str], None] | None = None,
    check: Callable[[PaliGemmaConfig], Any] | None = None,
) -> Loaded:
    """Check the job's options, load checkpoint and inputs (validated against the config) and build the model.
    `check(config)` runs before any tensor is read (e.g. to validate capture points)."""
    t0 = time.perf_counter()
    conv = conventions(job.conventions, job.settings)
    compute = check_dtypes(job.dtype, job.compute_dtype)
    be = backends.get(job.impl)
    if job.mesh and "mesh" not in be.build_options:
        raise UsageError(f"--mesh is an option of --impl jax (got --impl {job.impl})")
    device = be.resolve_device(job.device)
    if warn is not None and (msg := be.speed_warning(compute, device)):
        warn(msg)
    ckpt = hub.resolve(job.checkpoint)

    def on_chunk(done: int, total: int, key: str) -> None:
        monitor.check()
        if progress:
            progress("loading", done, total)

    with open_checkpoint(ckpt, job.config_arg) as ck:  # a streamed run reopens it: parity.stream holds it open
        cfg = ck.config
        inputs = load_inputs(job.inputs, cfg)
        if check is not None:
            check(cfg)
        # Refuse (exit 2, one line) a run that would not fit in memory before any tensor is read; stream one that
        # would fit only streamed, or when asked (parity.stream).
        fit = estimate.check_fits(
            cfg, inputs, job.impl, compute, job.dtype, ck, work(job, cfg), device=device, stream=job.stream
        )
        # Parameters computed in another dtype (bf16 values, float32 compute) are rounded to `dtype` here;
        # otherwise the implementation casts them.
        rounding = FLOAT_DTYPES.get(job.dtype, np.dtype(job.dtype)) if compute != job.dtype else None
        if not fit.stream:
            options = {"mesh": job.mesh} if job.mesh else {}
            # torch / jax load block by block straight into their tensors (no numpy copy beside them); other
            # backends get the numpy dict.
            params = ck.load(rounding, on_chunk, stream=getattr(be, "loads_blocks", False))
            model = be.build_model(
                cfg, conv, dtype=compute, device=device, params=params, precision=job.precision, **options
            )
            del params
    if progress:
        progress("building", None, None)
    if fit.stream:  # reopens the checkpoint and keeps it open for the run (parity.stream)
        be, model = stream.open_streamed(be, ckpt, cfg, job, conv, compute, rounding, device, warn, fit.note)
    if progress:
        progress("hashing", None, None)
    manifest = {
        "config": cfg.to_dict(),
        "conventions": conv.to_dict(),
        "impl": job.impl,
        "dtype": job.dtype,
        "compute_dtype": compute,
        "device": be.device_description(device),
        "precision": job.precision,
        **be.manifest(model),
        "libraries": library_versions(),
        "checkpoint": {"path": os.path.abspath(ckpt), "sha256": file_sha256(ckpt)},
        "inputs": {
            "path": os.path.abspath(job.inputs),
            "sha256": inputs_sha256(inputs),
            "file_sha256": file_sha256(job.inputs),
            "shapes": {k: list(v.shape) for k, v in inputs.items()},
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_seconds": round(time.perf_counter() - t0, 3),
    }
    return Loaded(be, model, cfg, inputs, manifest)


def _counting(cfg: PaliGemmaConfig, progress: Progress | None, decode_total: int | None = None):
    """A monitor reporter turning block/token ticks into forward (blocks) and decoding (tokens) progress."""
    if progress is None:
        return None
    blocks = cfg.vision.depth + cfg.text.depth
    state = {"blocks": 0, "tokens": 0}
    progress("forward", 0, blocks)

    def report(unit: str) -> None:
        if unit == "token":
            state["tokens"] += 1
            progress("decoding", state["tokens"], decode_total)
        elif unit == "block" and state["tokens"] == 0 and state["blocks"] < blocks:
            state["blocks"] += 1
            progress("forward", state["blocks"], blocks)

    return report


def point_dtype(compute: str) -> type:
    """The dtype captured points are written in: float32, or float64 for a float64 run (nothing rounded away)."""
    return np.float64 if compute == "float64" else np.float32


def point_dtype_of(x) -> type:
    """float64 for a float64 array (a float64 run), else float32."""
    return np.float64 if np.asarray(x).dtype == np.float64 else np.float32


def tensor_fields(arrays: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items()}


def _write(path: str | None, arrays: dict[str, np.ndarray], manifest: dict, progress: Progress | None) -> None:
    if path is None:
        return
    if progress:
        progress("writing", None, None)
    write_capture(path, arrays, manifest, overwrite=True)


def record_run(
    job: Job,
    progress: Progress | None = None,
    warn: Callable[[str], None] | None = None,
) -> Record:
    """Run `job`: its forward points into `job.capture`, its teacher-forced units into `job.teacher_output`, its
    decoding into `job.generate.output` (each file written whole under a temporary name, or not at all)."""
    if (env := own_process(job)) is not None:
        return _record_elsewhere(job, env)
    wanted: list[str] | None = None

    def check(cfg: PaliGemmaConfig) -> None:
        nonlocal wanted
        if job.capture is not None:
            wanted = pts.select(pts.forward_points(cfg), job.points)

    loaded = load(job, progress, warn, check)
    try:
        be, model, cfg, batch = loaded.backend, loaded.model, loaded.config, loaded.inputs
        rec = Record(loaded)
        if wanted is not None:
            t0 = time.perf_counter()
            with monitor.reporting(_counting(cfg, progress)):
                out = be.forward(model, batch, wanted)
            wide = point_dtype(loaded.manifest["compute_dtype"])
            arrays = {k: np.ascontiguousarray(out[k], wide) for k in wanted if k in out}
            rec.capture = {
                **loaded.manifest,
                "points": list(arrays),
                "tensors": tensor_fields(arrays),
                "run_seconds": round(time.perf_counter() - t0, 3),
            }
            if notes := be.notes(model):
                rec.capture["notes"] = notes
            _write(job.capture, arrays, rec.capture, progress)
            if job.teacher_from:
                blocks = teacher_forced_blocks(be, model, cfg, batch, job.teacher_from)
                blocks = {k: np.ascontiguousarray(v, wide) for k, v in blocks.items()}
                rec.teacher = {
                    **rec.capture,
                    "points": list(blocks),
                    "tensors": tensor_fields(blocks),
                    "teacher_forced_from": job.teacher_from,
                }
                _write(job.teacher_output, blocks, rec.teacher, progress)
        if job.generate is not None:
            rec.generated, rec.generation = _decode(loaded, job.generate, progress)
            _write(job.generate.output, _generation_arrays(rec.generated, cfg), rec.generation, progress)
        return rec
    finally:
        stream.close(loaded.model)


def _decode(loaded: Loaded, g, progress: Progress | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """backend.generate as the job's Generate asks, and the generation file's manifest."""
    cfg = loaded.config
    forced = {}
    if g.forced_from:
        forced["forced_tokens"] = read_capture(g.forced_from)[0]["tokens"]
    t0 = time.perf_counter()
    with monitor.reporting(_counting(cfg, progress, g.steps)):
        out = loaded.backend.generate(
            loaded.model,
            loaded.inputs,
            g.steps,
            greedy=g.greedy,
            temperature=1.0 if g.temperature is None else g.temperature,
            top_k=g.top_k,
            top_p=g.top_p,
            seed=g.seed or 0,
            return_logits=g.logits,
            ignore_eos=g.ignore_eos,
            **({"capture": list(pts.cache_points(cfg))} if g.caches else {}),
            **({"compile": g.compile} if g.compile is not None else {}),
            **forced,
        )
    arrays = _generation_arrays(out, cfg)
    manifest = {
        **loaded.manifest,
        "points": list(arrays),
        "tensors": tensor_fields(arrays),
        "run_seconds": round(time.perf_counter() - t0, 3),
        "sampling": g.sampling(),
        "decode_path": out.get("decode_path"),
        **g.record,
    }
    return out, manifest


def _generation_arrays(g: dict[str, Any], cfg: PaliGemmaConfig) -> dict[str, np.ndarray]:
    """A generation file's tensors: tokens int32[B, N], step logits float32[B, N, V], the cache points (float64
    for a float64 run)."""
    arrays = {"tokens": np.ascontiguousarray(g["tokens"], np.int32)}
    if "logits" in g:
        arrays["logits"] = np.ascontiguousarray(g["logits"], point_dtype_of(g["logits"]))
    arrays.update({k: np.ascontiguousarray(g[k], point_dtype_of(g[k])) for k in pts.cache_points(cfg) if k in g})
    return arrays


def teacher_forced_blocks(be, model, cfg: PaliGemmaConfig, batch, reference: str) -> dict[str, np.ndarray]:
    """Every unit of `model` run on the reference capture's input to that unit, in forward order: the blocks (a
    BlockBackend's vit_block / llm_block) and, when the backend is a UnitBackend, the units between and after them
    (points.graph_units: encoder norm, projector, image/text concatenation + embedding scale, final norm, head)."""
    if not isinstance(be, backends.BlockBackend):
        raise UsageError(f"--teacher-forced: implementation {be.name!r} has no vit_block/llm_block")
    graph = pts.graph_units(cfg) if isinstance(be, backends.UnitBackend) else {}
    ref = Capture(reference)
    out: dict[str, np.ndarray] = {}

    def units(*points: str) -> None:
        for p in points:
            if p in graph and graph[p] in ref.points:
                out[p] = be.unit(model, p, ref.read(graph[p]), batch)

    try:
        for i in range(cfg.vision.depth):
            src = pts.IMG_POS_EMBED if i == 0 else pts.img_block_out(i - 1)
            if src in ref.points:
                out.update(be.vit_block(model, i, ref.read(src)))
        units(pts.IMG_FINAL_NORM, pts.PROJECTOR, pts.LLM_INPUT)
        for i in range(cfg.text.depth):
            src = pts.LLM_INPUT if i == 0 else pts.llm_block_out(i - 1)
            if src in ref.points:
                out.update(be.llm_block(model, i, ref.read(src), batch))
        units(pts.LLM_FINAL_NORM, pts.LOGITS)
    finally:
        ref.close()
    return out


# -- a run in a process of its own (jax float64: x64 mode is process-wide and never flipped in a running process) --
def own_process(job: Job) -> dict[str, str] | None:
    """The environment of the fresh process `job` needs (the backend's `own_process(dtype)`), or None."""
    compute = check_dtypes(job.dtype, job.compute_dtype)
    if compute != "float64":  # only float64 needs one today (jax x64): no backend imported to ask
        return None
    ask = getattr(backends.get(job.impl), "own_process", None)
    return ask(compute) if ask is not None else None


def _record_elsewhere(job: Job, env: dict[str, str]) -> Record:
    """Run `job` in a fresh process with `env` added (python -m parity.compare.worker, the compare sides' worker)
    and read back what it wrote. A decoding with no output file writes one to a temporary directory."""
    import json
    import subprocess
    import sys
    import tempfile

    from parity import errors

    with tempfile.TemporaryDirectory(prefix="parity-own-process-") as tmp:
        g = job.generate
        if g is not None and g.output is None:
            job = dataclasses.replace(job, generate=dataclasses.replace(g, output=os.path.join(tmp, "gen.safetensors")))
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        penv = {**os.environ, **env}
        penv["PYTHONPATH"] = os.pathsep.join([root] + ([penv["PYTHONPATH"]] if penv.get("PYTHONPATH") else []))
        p = subprocess.run(
            [sys.executable, "-m", "parity.compare.worker"],
            input=job.to_json(),
            text=True,
            capture_output=True,
            env=penv,
        )
        lines = p.stdout.strip().splitlines()
        try:
            reply = json.loads(lines[-1]) if lines else {}
        except json.JSONDecodeError:
            reply = {}
        if p.returncode != 0 or "capture" not in reply:
            if "error" in reply:
                cls = getattr(errors, reply.get("class", ""), None)
                raise (cls if isinstance(cls, type) and issubclass(cls, errors.ParityError) else errors.ParityError)(
                    reply["error"]
                )
            tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
            raise errors.ParityError(f"{job.impl} {job.dtype} run in its own process failed ({p.returncode}): {tail}")
        rec = Record(Loaded(backends.get(job.impl), None, None, {}, {}))
        if job.capture is not None:
            rec.capture = capture_header(job.capture)[1]
        if job.teacher_output is not None and reply.get("teacher"):
            rec.teacher = capture_header(job.teacher_output)[1]
        if job.generate is not None:
            tensors, rec.generation = read_capture(job.generate.output)
            rec.generated = {**tensors, "decode_path": rec.generation.get("decode_path")}
        first = rec.capture or rec.generation or {}
        drop = ("points", "tensors", "run_seconds", "notes", "sampling", "decode_path")
        rec.loaded.manifest = {k: v for k, v in first.items() if k not in drop}
    return rec
