"""Library entry points behind `parity capture` and `parity generate`: checkpoint + inputs -> captured points or
generated tokens, with a manifest recording everything needed to reproduce them.

The implementation is chosen by name (`impl`); only the chosen framework is imported, and device names, speed
warnings and model building go through its api module (parity.torch_impl.api, parity.jax_impl.api).
Every option is checked before the checkpoint is read, so a typo costs nothing.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import platform
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from converters import hub, safetensors_io
from converters.atomic import atomic_output
from converters.checkpoint import open_checkpoint
from converters.dtypes import FLOAT_DTYPES, ST_ALL_DTYPES
from converters.rawio import JSONProblem, loads_strict
from parity import estimate, monitor
from parity import points as pts
from parity.config import PaliGemmaConfig
from parity.conventions import Conventions, get_conventions, with_settings
from parity.errors import CheckpointError, ConfigError, OutputError, UsageError, describe
from parity.inputs import inputs_sha256, load_inputs

IMPLS = {
    "torch": "parity.torch_impl.api",
    "jax": "parity.jax_impl.api",
    "transformers": "parity.hf_side",
}  # transformers: an optional outside side
LIBRARIES = ("paligemma-parity", "numpy", "ml_dtypes", "torch", "jax", "jaxlib", "flax", "transformers", "safetensors")
DTYPES = ("float32", "bfloat16", "float16")
OUTPUT_SUFFIX = ".safetensors"

# progress(stage, done, total): stage "loading" (bytes), "building", "hashing" (sha256 of the files), "forward"
# (blocks), "decoding" (tokens), "writing"; done/total None when unknown.
Progress = Callable[[str, float | None, float | None], None]


def file_sha256(path: str) -> str:
    """sha256 of a file, or of a directory's files (sorted names and contents); cached per file version."""
    from converters import digest

    return digest.file_sha256(path)


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


# -- options, checked before any file is read ---------------------------------------------------------------------
def impl_api(name: str):
    """The api module of implementation `name` (ConfigError naming the available ones)."""
    if name not in IMPLS:
        raise ConfigError(f"--impl {name!r}; available: {', '.join(IMPLS)}")
    return importlib.import_module(IMPLS[name])


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


def _jax_manifest(model) -> dict[str, Any]:
    """What a jax run adds to the manifest: backend, device kind, mesh, the persistent compilation cache (if any)."""
    import jax

    return {
        "backend": model.backend,
        "device_kind": model.device_kind,
        "mesh": model.mesh_spec,
        "compile_cache": jax.config.jax_compilation_cache_dir or None,
    }


def prepare(
    ckpt: str,
    inputs_path: str,
    impl: str,
    convention: str | Conventions,
    dtype: str,
    device: str,
    config: PaliGemmaConfig | str | None = None,
    *,
    settings: list[str] | tuple[str, ...] = (),
    compute_dtype: str | None = None,
    progress: Progress | None = None,
    warn: Callable[[str], None] | None = None,
    check: Callable[[PaliGemmaConfig], Any] | None = None,
    precision: str = "highest",
    mesh: str | None = None,
    work: estimate.Work | None = None,
):
    """Check the options, load checkpoint and inputs (validated against the config) and build the model.
    `check(config)` runs before any tensor is read (e.g. to validate capture points); so does the memory check
    (parity.estimate), for what `work` will do after loading (default: capture every point).
    Returns (api, model, config, inputs, manifest)."""
    t0 = time.perf_counter()
    conv = conventions(convention, settings)
    compute = check_dtypes(dtype, compute_dtype)
    api = impl_api(impl)
    if mesh and impl != "jax":
        raise UsageError(f"--mesh is an option of --impl jax (got --impl {impl})")
    device = api.resolve_device(device)
    speed_warning = getattr(api, "speed_warning", None)
    if warn is not None and speed_warning is not None and (msg := speed_warning(compute, device)):
        warn(msg)
    ckpt = hub.resolve(ckpt)

    def on_chunk(done: int, total: int, key: str) -> None:
        monitor.check()
        if progress:
            progress("loading", done, total)

    with open_checkpoint(ckpt, config) as ck:
        cfg = ck.config
        inputs = load_inputs(inputs_path, cfg)
        if check is not None:
            check(cfg)
        estimate.check_fits(cfg, inputs, impl, compute, dtype, ck, work, device=device)  # exit 2 if too big
        # Parameters computed in another dtype (bf16 values, float32 compute) are rounded to `dtype` here;
        # otherwise the implementation casts them.
        params = ck.load(FLOAT_DTYPES[dtype] if compute != dtype else None, on_chunk)
    if progress:
        progress("building", None, None)
    model = api.build_model(
        cfg, conv, dtype=compute, device=device, params=params, precision=precision, **({"mesh": mesh} if mesh else {})
    )
    del params
    if progress:
        progress("hashing", None, None)
    manifest = {
        "config": cfg.to_dict(),
        "conventions": conv.to_dict(),
        "impl": impl,
        "dtype": dtype,
        "compute_dtype": compute,
        "device": api.device_description(device),
        "precision": precision,
        **(_jax_manifest(model) if impl == "jax" else {}),
        "libraries": library_versions(),
        "checkpoint": {"path": os.path.abspath(ckpt), "sha256": file_sha256(ckpt)},
        "inputs": {
            "path": os.path.abspath(inputs_path),
            "sha256": inputs_sha256(inputs),
            "file_sha256": file_sha256(inputs_path),
            "shapes": {k: list(v.shape) for k, v in inputs.items()},
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_seconds": round(time.perf_counter() - t0, 3),
    }
    return api, model, cfg, inputs, manifest


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


def _tensor_fields(arrays: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items()}


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
    t0 = time.perf_counter()
    output = check_output(output, overwrite)
    api, model, cfg, batch, manifest = prepare(
        ckpt,
        inputs,
        impl,
        convention,
        dtype,
        device,
        config,
        settings=settings,
        compute_dtype=compute_dtype,
        progress=progress,
        warn=warn,
        check=lambda c: pts.select(pts.forward_points(c), points),
        precision=precision,
        mesh=mesh,
        work=estimate.Work("capture", points=points),
    )
    wanted = pts.select(pts.forward_points(cfg), points)
    t1 = time.perf_counter()
    with monitor.reporting(_counting(cfg, progress)):
        out = api.forward(model, batch, wanted)
    run_seconds = time.perf_counter() - t1
    arrays = {k: np.ascontiguousarray(out[k], np.float32) for k in wanted}
    manifest.update(points=wanted, tensors=_tensor_fields(arrays), run_seconds=round(run_seconds, 3))
    if progress:
        progress("writing", None, None)
    write_capture(output, arrays, manifest, overwrite)
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
    api, model, cfg, batch, manifest = prepare(
        ckpt,
        inputs,
        impl,
        convention,
        dtype,
        device,
        config,
        settings=settings,
        compute_dtype=compute_dtype,
        progress=progress,
        warn=warn,
        precision=precision,
        mesh=mesh,
        work=estimate.Work("generate", new_tokens=max_new_tokens, step_logits=output is not None),
    )
    temperature = 1.0 if temperature is None else temperature
    t1 = time.perf_counter()
    with monitor.reporting(_counting(cfg, progress, max_new_tokens)):
        g = api.generate(
            model,
            batch,
            max_new_tokens,
            greedy=greedy,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            compile=compile,
            return_logits=output is not None,
            ignore_eos=ignore_eos,
        )
    run_seconds = time.perf_counter() - t1
    rows = []
    for b, ids in enumerate(g["tokens"].tolist()):
        n = ids.index(1) + 1 if 1 in ids and not ignore_eos else len(ids)
        row = {"row": b, "tokens": ids[:n]}
        if tok is not None:
            row["text"] = decode_tokens(tok, ids)
        rows.append(row)
    manifest.update(
        sampling={
            "greedy": greedy,
            "temperature": None if greedy else temperature,
            "top_k": top_k,
            "top_p": top_p,
            "seed": seed,
            "max_new_tokens": max_new_tokens,
            "ignore_eos": ignore_eos,
        },
        decode_path=g.get("decode_path"),
        run_seconds=round(run_seconds, 3),
    )
    if output is not None:
        arrays = {
            "tokens": np.ascontiguousarray(g["tokens"], np.int32),
            "logits": np.ascontiguousarray(g["logits"], np.float32),
        }
        manifest["tensors"] = _tensor_fields(arrays)
        if progress:
            progress("writing", None, None)
        write_capture(output, arrays, manifest, overwrite)
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
