"""Library entry points behind `parity capture` and `parity generate`: checkpoint + inputs -> captured points or
generated tokens, with a manifest recording everything needed to reproduce them.

The implementation is chosen by name (`impl`); only the chosen framework is imported.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import os
import platform
import time
from typing import Any

import numpy as np

from converters import hub, safetensors_io
from converters.checkpoint import load_checkpoint
from converters.convert import atomic_output
from parity import points as pts
from parity.config import PaliGemmaConfig
from parity.conventions import Conventions, get_conventions
from parity.errors import ConfigError, OutputError, describe
from parity.inputs import inputs_sha256, load_inputs

IMPLS = {"torch": "parity.torch_impl.api", "transformers": "parity.hf_side"}  # transformers: optional side
LIBRARIES = ("paligemma-parity", "numpy", "ml_dtypes", "torch", "jax", "flax", "transformers", "safetensors")


def file_sha256(path: str) -> str:
    """sha256 of a file, or of a directory's files (sorted names and contents)."""
    h = hashlib.sha256()
    paths = [path] if os.path.isfile(path) else [
        os.path.join(d, f) for d, _, fs in sorted(os.walk(path)) for f in sorted(fs)]
    for p in paths:
        if os.path.isdir(path):
            h.update(os.path.relpath(p, path).encode() + b"\0")
        with open(p, "rb") as f:
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


def _impl(name: str):
    if name not in IMPLS:
        raise ConfigError(f"--impl {name!r}; available: {', '.join(IMPLS)}")
    return importlib.import_module(IMPLS[name])


def _conventions(convention: str | Conventions) -> Conventions:
    if isinstance(convention, Conventions):
        return convention
    try:
        return get_conventions(convention)
    except KeyError as e:
        raise ConfigError(str(e.args[0])) from None


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"{device} ({platform.processor() or platform.machine()})"


def prepare(ckpt: str, inputs_path: str, impl: str, convention: str | Conventions, dtype: str, device: str,
            config: PaliGemmaConfig | str | None = None):
    """Load checkpoint and inputs (validated against the config) and build the model."""
    conv = _conventions(convention)
    api = _impl(impl)
    ckpt = hub.resolve(ckpt)
    cfg, params = load_checkpoint(ckpt, config)
    inputs = load_inputs(inputs_path, cfg)
    model = api.build_model(cfg, conv, dtype=dtype, device=device, params=params)
    manifest = {
        "config": cfg.to_dict(), "conventions": conv.to_dict(), "impl": impl, "dtype": dtype,
        "device": _device_name(device), "libraries": library_versions(),
        "checkpoint": {"path": os.path.abspath(ckpt), "sha256": file_sha256(ckpt)},
        "inputs": {"path": os.path.abspath(inputs_path), "sha256": inputs_sha256(inputs),
                   "file_sha256": file_sha256(inputs_path),
                   "shapes": {k: list(v.shape) for k, v in inputs.items()}},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return api, model, cfg, inputs, manifest


def capture(ckpt: str, inputs: str, output: str, impl: str = "torch", convention: str | Conventions = "big_vision",
            dtype: str = "float32", device: str = "cpu", points: str | list[str] | None = None,
            config: PaliGemmaConfig | str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Run a forward pass, write every selected point plus `logits` (float32) to a safetensors file whose header
    metadata holds the manifest under "parity_manifest". Returns the manifest."""
    output = os.path.abspath(output)
    if os.path.lexists(output) and not overwrite:
        raise OutputError(describe(output, what="output exists; pass --overwrite to replace it"))
    api, model, cfg, batch, manifest = prepare(ckpt, inputs, impl, convention, dtype, device, config)
    wanted = pts.select(pts.forward_points(cfg), points)
    if not wanted or (wanted == [pts.LOGITS] and points not in (None, "logits")):
        raise ConfigError(f"--points {points!r} selects no capture point except logits "
                          f"(e.g. 'llm/layer0*/attn', 'img/*'; see parity.points)")
    t0 = time.perf_counter()
    out = api.forward(model, batch, wanted)
    manifest.update(points=wanted, seconds=round(time.perf_counter() - t0, 3))
    specs = [(k, np.dtype(np.float32), tuple(out[k].shape)) for k in wanted]
    with atomic_output(output, False, overwrite) as tmp:
        with open(tmp, "wb") as f:
            safetensors_io.write_file(f, specs, ([np.ascontiguousarray(out[k], np.float32)] for k in wanted),
                                      metadata={"format": "np", "parity_manifest": json.dumps(manifest)})
    manifest["output"] = output
    return manifest


def read_capture(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors, manifest) of a capture file."""
    r = safetensors_io.SafetensorsReader.open(path)
    try:
        manifest = json.loads(r.metadata.get("parity_manifest", "{}"))
        return {k: r.read(k) for k in r.keys()}, manifest
    finally:
        r.close()


def generate(ckpt: str, inputs: str, max_new_tokens: int, impl: str = "torch",
             convention: str | Conventions = "big_vision", dtype: str = "float32", device: str = "cpu",
             greedy: bool = True, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, tokenizer: str | None = None, config: PaliGemmaConfig | str | None = None,
             compile: str | None = None) -> dict[str, Any]:
    """Generated token ids per row (and text when a SentencePiece tokenizer file is given), with the manifest."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    api, model, cfg, batch, manifest = prepare(ckpt, inputs, impl, convention, dtype, device, config)
    t0 = time.perf_counter()
    g = api.generate(model, batch, max_new_tokens, greedy=greedy, temperature=temperature, top_k=top_k,
                     top_p=top_p, seed=seed, compile=compile)
    seconds = time.perf_counter() - t0
    rows = []
    tok = None
    if tokenizer is not None:
        from parity.processor import Tokenizer, decode_tokens
        tok = Tokenizer(tokenizer)
    for b, ids in enumerate(g["tokens"].tolist()):
        n = ids.index(1) + 1 if 1 in ids else len(ids)
        row = {"row": b, "tokens": ids[:n]}
        if tok is not None:
            row["text"] = decode_tokens(tok, ids)
        rows.append(row)
    manifest.update(sampling={"greedy": greedy, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                              "seed": seed, "max_new_tokens": max_new_tokens},
                    decode_path=g.get("decode_path"), seconds=round(seconds, 3))
    return {"rows": rows, "manifest": manifest}
