"""Library entry points behind `parity capture` and `parity generate`: checkpoint + inputs -> captured points or
generated tokens, with a manifest recording everything needed to reproduce them.

The implementation is chosen by name (`impl`, a backend of parity.backend's registry); only the chosen framework is
imported. The run itself is parity.pipeline.record_run; this module holds the option checks it shares with the
CLI, the capture-file format (a safetensors file with the manifest in its header) and the digests of the manifest.
Every option is checked before the checkpoint is read, so a typo costs nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import platform
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from converters import safetensors_io
from converters.atomic import atomic_output
from converters.checkpoint import open_checkpoint
from converters.dtypes import ST_ALL_DTYPES
from converters.rawio import JSONProblem, loads_strict, open_regular
from parity import backend, monitor
from parity import points as pts
from parity.backend import DTYPES, Backend
from parity.config import PaliGemmaConfig
from parity.conventions import Conventions, get_conventions, with_settings
from parity.errors import CheckpointError, ConfigError, OutputError, UsageError, describe
from parity.inputs import load_inputs

LIBRARIES = ("paligemma-parity", "numpy", "ml_dtypes", "torch", "jax", "jaxlib", "flax", "transformers", "safetensors")
OUTPUT_SUFFIX = ".safetensors"

# progress(stage, done, total): stage "loading" (bytes), "building", "hashing" (sha256 of the files), "forward"
# (blocks), "decoding" (tokens), "writing"; done/total None when unknown.
Progress = Callable[[str, float | None, float | None], None]


def file_sha256(path: str) -> str:
    """sha256 of a file, or of a directory's files (sorted names and contents)."""
    h = hashlib.sha256()
    paths = (
        [path]
        if os.path.isfile(path)
        else [os.path.join(d, f) for d, _, fs in sorted(os.walk(path)) for f in sorted(fs)]
    )
    for p in paths:
        if os.path.isdir(path):
            h.update(os.path.relpath(p, path).encode() + b"\0")
        with os.fdopen(open_regular(p), "rb") as f:  # a FIFO beside the checkpoint must not block forever
            while chunk := f.read(16 << 20):
                h.update(chunk)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


# -- options, checked before any file is read ---------------------------------------------------------------------
def impl_api(name: str) -> Backend:
    """The backend registered as `name` (parity.backend.get; ConfigError naming the available ones)."""
    return backend.get(name)


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


MAX_SEED = 2**63 - 1


def check_sampling(
    greedy: bool, temperature: float | None, top_k: int | None, top_p: float | None, seed: int = 0
) -> None:
    """Refuse values that cannot mean anything, and greedy decoding combined with sampling options."""
    if not 0 <= seed <= MAX_SEED:
        raise UsageError(f"--seed must be in 0..{MAX_SEED}, got {seed}")
    if temperature is not None and not temperature > 0:
        raise UsageError(f"--temperature must be > 0, got {temperature} (for greedy decoding use --greedy)")
    if top_k is not None and top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {top_p}")
    given = [f for f, v in (("--temperature", temperature), ("--top-k", top_k), ("--top-p", top_p)) if v is not None]
    if greedy and given:
        raise UsageError(f"--greedy contradicts {', '.join(given)} (sampling options); drop them or pass --sample")


def check_output(output: str, overwrite: bool) -> str:
    """Absolute path of a safetensors output that may be written (refused before any work)."""
    output = os.path.abspath(output)
    if not output.endswith(OUTPUT_SUFFIX):
        raise OutputError(
            describe(
                output,
                expected=f"a {OUTPUT_SUFFIX} name",
                found=repr(os.path.splitext(output)[1] or "no suffix"),
                what="outputs are safetensors files (manifest in the header)",
            )
        )
    if os.path.lexists(output) and not overwrite:
        raise OutputError(describe(output, what="output exists; pass --overwrite to replace it"))
    if not os.path.isdir(os.path.dirname(output)):
        raise OutputError(describe(output, what=f"output directory {os.path.dirname(output)} does not exist"))
    return output


# -- running ------------------------------------------------------------------------------------------------------
def interruptible(fn: Callable[..., Any], *args, grace: float = 2.0, **kwargs) -> Any:
    """fn(*args, **kwargs) in a worker thread, so that Ctrl-C reaches this (main) thread at once even while the
    worker sits in one long native operation. On KeyboardInterrupt: set `monitor.cancelled` (the worker stops at
    its next checkpoint, cleaning up its outputs), wait up to `grace` seconds for it, and re-raise."""
    monitor.cancelled.clear()
    box: dict[str, Any] = {}

    def work():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:
            box["error"] = e

    worker = threading.Thread(target=work, name="parity-run", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.05)
    except KeyboardInterrupt:
        monitor.cancelled.set()
        worker.join(grace)
        raise KeyboardInterrupt() from None
    if "error" in box:
        raise box["error"]
    return box["value"]


def write_capture(output: str, arrays: dict[str, np.ndarray], manifest: dict, overwrite: bool = False) -> None:
    """One safetensors file (the manifest in the header), written atomically; a Ctrl-C before it writes nothing."""
    monitor.check()
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in arrays.items()]
    with atomic_output(output, False, overwrite) as tmp:
        with open(tmp, "wb") as f:
            safetensors_io.write_file(
                f,
                specs,
                ([np.ascontiguousarray(v)] for v in arrays.values()),
                metadata={"format": "np", "parity_manifest": json.dumps(manifest)},
            )


def capture(
    ckpt: str,
    inputs: str,
    output: str,
    impl: str = "torch",
    convention: str | Conventions = "big_vision",
    dtype: str = "float32",
    device: str = "cpu",
    points: str | list[str] | None = None,
    config: PaliGemmaConfig | str | None = None,
    overwrite: bool = False,
    *,
    settings: list[str] | tuple[str, ...] = (),
    compute_dtype: str | None = None,
    progress: Progress | None = None,
    warn: Callable[[str], None] | None = None,
    precision: str = "highest",
    mesh: str | None = None,
) -> dict[str, Any]:
    """Run a forward pass, write every selected point plus `logits` (float32) to a safetensors file whose header
    metadata holds the manifest under "parity_manifest". Returns the manifest (with "output")."""
    from parity.job import Job
    from parity.pipeline import record_run

    t0 = time.perf_counter()
    output = check_output(output, overwrite)
    job = Job(
        ckpt,
        inputs,
        impl,
        convention,
        settings,
        config,
        dtype,
        compute_dtype,
        device,
        precision,
        mesh,
        capture=output,
        points=points,
    )
    manifest = record_run(job, progress, warn).capture
    manifest.update(seconds=round(time.perf_counter() - t0, 3), output=output)
    return manifest


# Captures hold float32 points; generation files also hold int32 tokens.
CAPTURE_DTYPES = {k: v for k, v in ST_ALL_DTYPES.items() if not k.startswith("F8")}


def capture_manifest(path: str, raw: str) -> dict[str, Any]:
    """The manifest of a capture file from its header text; CheckpointError (one line) if malformed."""
    try:
        manifest = loads_strict(raw)
    except JSONProblem as e:
        raise CheckpointError(describe(path, "parity_manifest", what=f"unreadable capture manifest: {e}")) from None
    if not isinstance(manifest, dict):
        raise CheckpointError(
            describe(path, "parity_manifest", "a JSON object", type(manifest).__name__, "unreadable capture manifest")
        )
    return manifest


def read_capture(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors, manifest) of a capture or generation file (tensors in the manifest's point order, then file
    order); CheckpointError (one line) for anything malformed."""
    with safetensors_io.SafetensorsReader.open(path, allowed=CAPTURE_DTYPES) as r:
        manifest = capture_manifest(path, r.metadata.get("parity_manifest", "{}"))
        keys = list(r.keys())
        listed = manifest.get("points", [])
        listed = [k for k in listed if isinstance(k, str) and k in keys] if isinstance(listed, list) else []
        order = listed + [k for k in keys if k not in listed]
        return {k: r.read(k) for k in order}, manifest


def generate(
    ckpt: str,
    inputs: str,
    max_new_tokens: int,
    impl: str = "torch",
    convention: str | Conventions = "big_vision",
    dtype: str = "float32",
    device: str = "cpu",
    greedy: bool = True,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    tokenizer: str | None = None,
    config: PaliGemmaConfig | str | None = None,
    compile: str | None = None,
    *,
    output: str | None = None,
    overwrite: bool = False,
    settings: list[str] | tuple[str, ...] = (),
    compute_dtype: str | None = None,
    progress: Progress | None = None,
    warn: Callable[[str], None] | None = None,
    precision: str = "highest",
    mesh: str | None = None,
    ignore_eos: bool = False,
) -> dict[str, Any]:
    """Generated token ids per row (and text when a SentencePiece tokenizer file is given), with the manifest.

    greedy=False samples with temperature (default 1.0), top_k, top_p, seed; passing any of those with greedy=True
    is refused. `output`: also write tokens (int32[B, N]) and step logits (float32[B, N, V]) with the manifest to a
    safetensors file."""
    from parity.job import Generate, Job
    from parity.pipeline import record_run

    t0 = time.perf_counter()
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    check_sampling(greedy, temperature, top_k, top_p, seed)
    if output is not None:
        output = check_output(output, overwrite)
    tok = None
    if tokenizer is not None:
        from parity.processor import Tokenizer, decode_tokens

        tok = Tokenizer(tokenizer)
    decode = Generate(
        max_new_tokens,
        greedy,
        temperature,
        top_k,
        top_p,
        seed,
        ignore_eos,
        compile,
        caches=False,
        logits=output is not None,
        output=output,
    )
    job = Job(ckpt, inputs, impl, convention, settings, config, dtype, compute_dtype, device, precision, mesh)
    rec = record_run(dataclasses.replace(job, generate=decode), progress, warn)
    rows = []
    for b, ids in enumerate(rec.generated["tokens"].tolist()):
        n = ids.index(1) + 1 if 1 in ids and not ignore_eos else len(ids)
        row = {"row": b, "tokens": ids[:n]}
        if tok is not None:
            row["text"] = decode_tokens(tok, ids)
        rows.append(row)
    manifest = rec.generation
    if output is None:  # nothing written: no tensors to describe
        del manifest["points"], manifest["tensors"]
    else:
        manifest["output"] = output
    manifest["seconds"] = round(time.perf_counter() - t0, 3)
    return {"rows": rows, "manifest": manifest}


def list_points(
    ckpt: str, config: PaliGemmaConfig | str | None = None, inputs: str | None = None, max_new_tokens: int | None = None
) -> dict[str, Any]:
    """Every capture point of a checkpoint's config (or of a variant name given as `ckpt`) with its shape:
    concrete batch and text length when an inputs file is given, letters otherwise."""
    from converters.checkpoint import resolve_config

    if config is None and not os.path.exists(ckpt) and ":" not in ckpt:
        try:
            cfg = resolve_config(ckpt)
        except ConfigError:
            cfg = None
        if cfg is None:
            raise ConfigError(describe(ckpt, what="neither a checkpoint nor a variant name"), file=ckpt)
    else:
        with open_checkpoint(ckpt, config) as ck:
            cfg = ck.config
    batch, text_len = "B", "L"
    if inputs is not None:
        arrays = load_inputs(inputs, cfg)
        batch, text_len = arrays["text"].shape
    generation = set(pts.cache_points(cfg))
    shapes = pts.shapes(cfg, batch, text_len, max_new_tokens if max_new_tokens is not None else "N")
    return {
        "config": cfg.name,
        "points": [
            {"name": k, "shape": list(v), "dtype": "float32", "when": "generate" if k in generation else "forward"}
            for k, v in shapes.items()
        ],
    }
