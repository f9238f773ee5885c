"""`inspect`: what a checkpoint is, and every way in which it departs from the spec."""
from __future__ import annotations

import os

import numpy as np

from converters import dtypes
from converters.checkpoint import departures, expected_shapes, open_checkpoint
from parity import spec
from parity.config import PaliGemmaConfig


def inspect(path: str, config: PaliGemmaConfig | str | None = None) -> dict:
    """A report: format, config (and how it was found), dtypes, parameter count, per-tensor rows, departures.

    Never raises for departures (they are the report); raises CheckpointError for unreadable files.
    """
    with open_checkpoint(path, config, strict=False) as ck:
        cfg = ck.config
        exp = expected_shapes(cfg, ck.format) if cfg is not None else {}
        rows = []
        for k, shape in ck.shapes.items():
            status = "ok" if k in exp and tuple(exp[k]) == tuple(shape) else (
                "unexpected" if k not in exp else f"expected {list(exp[k])}")
            rows.append({"key": k, "shape": list(shape), "dtype": dtypes.name(ck.native_dtypes[k]),
                         "status": status})
        deps = [{"key": k, "expected": _j(e), "found": _j(f), "what": w}
                for k, e, f, w in (departures(ck.shapes, cfg, ck.format) if cfg is not None else [])]
        if cfg is None:
            deps.append({"key": None, "expected": "a known variant", "found": "unknown shapes",
                         "what": "config could not be determined; pass --config"})
        n_params = int(sum(np.prod(s) for s in ck.shapes.values()))
        padding = (cfg.hf_vocab_rows - cfg.text.vocab_size) * cfg.text.width if (
            cfg is not None and ck.format == "safetensors") else 0
        report = {
            "path": os.path.abspath(path),
            "format": ck.format,
            "config": cfg.name if cfg is not None else None,
            "config_source": ck.config_source,
            "family": cfg.family if cfg is not None else None,
            "dtypes": sorted({r["dtype"] for r in rows}),
            "tensors": len(rows),
            "parameters": n_params,
            "spec_parameters": spec.param_count(cfg) if cfg is not None else None,
            # file parameters = spec parameters + HF vocabulary padding rows (safetensors) + departures
            "vocab_padding_parameters": padding,
            "notes": list(ck.notes),
            "departures": deps,
            "conforms": not deps,
            "tensors_table": rows,
        }
        if cfg is not None:
            report["config_fields"] = cfg.to_dict()
        if ck.format == "safetensors" and cfg is not None:
            report["notes"].append(f"embed_tokens has {cfg.hf_vocab_rows} rows: {cfg.text.vocab_size} real + "
                                   f"{cfg.hf_vocab_rows - cfg.text.vocab_size} HF padding rows (dropped in npz)")
        return report


def _j(x):
    return list(x) if isinstance(x, tuple) else x
