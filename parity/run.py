"""Library entry points behind `parity capture` and `parity generate`: checkpoint + inputs -> captured points or
generated tokens, with a manifest recording everything needed to reproduce them.

The implementation is chosen by name (`impl`, a backend of parity.backend's registry); only the chosen framework is
imported. The run itself is parity.pipeline.record_run (a parity.job.Job); this module adds the command-level
checks (output name, sampling options), Ctrl-C handling and the report. The capture-file format lives in
parity.capture_file (its names are importable from here too). Every option is checked before the checkpoint is
read, so a typo costs nothing.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from converters.checkpoint import open_checkpoint
from parity import backend, monitor
from parity import points as pts
from parity.backend import Backend
from parity.capture_file import (  # noqa: F401  (the capture-file format, importable from here as before)
    CAPTURE_DTYPES,
    LIBRARIES,
    OUTPUT_SUFFIX,
    capture_manifest,
    check_output,
    file_sha256,
    library_versions,
    read_capture,
    write_capture,
)
from parity.config import PaliGemmaConfig
from parity.conventions import Conventions
from parity.errors import ConfigError, UsageError, describe
from parity.inputs import load_inputs
from parity.job import Generate, Job
from parity.pipeline import Progress, check_dtypes, conventions, record_run  # noqa: F401  (as before)


# -- options, checked before any file is read ---------------------------------------------------------------------
def impl_api(name: str) -> Backend:
    """The backend registered as `name` (parity.backend.get; ConfigError naming the available ones)."""
    return backend.get(name)


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
    stream: bool | None = None,
) -> dict[str, Any]:
    """Run a forward pass, write every selected point plus `logits` (float32) to a safetensors file whose header
    metadata holds the manifest under "parity_manifest". Returns the manifest (with "output"). `stream`: run
    block-streamed (parity.stream; None: when a resident run would not fit)."""
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
        stream=stream,
    )
    manifest = record_run(job, progress, warn).capture
    manifest.update(seconds=round(time.perf_counter() - t0, 3), output=output)
    return manifest


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
    stream: bool | None = None,
) -> dict[str, Any]:
    """Generated token ids per row (and text when a SentencePiece tokenizer file is given), with the manifest.

    greedy=False samples with temperature (default 1.0), top_k, top_p, seed; passing any of those with greedy=True
    is refused. `output`: also write tokens (int32[B, N]) and step logits (float32[B, N, V]) with the manifest to a
    safetensors file. `stream`: run block-streamed (parity.stream_generate: every decode step reads the weights
    again; None: when a resident run would not fit)."""
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
    rec = record_run(dataclasses.replace(job, generate=decode, stream=stream), progress, warn)
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
