"""`inspect`: what a checkpoint is, and every way in which it departs from the spec."""

from __future__ import annotations

import os

import numpy as np

from converters import dtypes
from converters.checkpoint import departures, expected_shapes, open_checkpoint
from converters.convert import Progress
from converters.reader import scan
from parity import estimate, spec
from parity.config import PaliGemmaConfig

NOT_READ = "headers only: tensor data was not read (no CRC-32 or value check); --verify reads every byte"
VERIFIED = (
    "every byte read (--verify): npz and orbax CRC-32 checked, safetensors offsets checked, NaN/inf values counted"
)


def inspect(
    path: str, config: PaliGemmaConfig | str | None = None, verify: bool = False, progress: Progress | None = None
) -> dict:
    """A report: format, config (and how it was found), dtypes, parameter count, per-tensor rows, departures, and
    the memory estimate of capture / compare / generate runs (parity.estimate.table).

    By default only headers are read. `verify` reads every byte: the CRC-32 of every npz member and orbax array
    (a mismatch is a CheckpointError: the file is corrupt), and every value of every tensor, counting non-finite
    ones (departures).
    Never raises for departures (they are the report); raises CheckpointError for unreadable files.
    """
    with open_checkpoint(path, config, strict=False) as ck:
        nonfinite = verify_data(ck, progress) if verify else {}
        cfg = ck.config
        exp = expected_shapes(cfg, ck.format) if cfg is not None else {}
        rows = []
        for k, shape in ck.shapes.items():
            status = (
                "ok"
                if k in exp and tuple(exp[k]) == tuple(shape)
                else ("unexpected" if k not in exp else f"expected {list(exp[k])}")
            )
            rows.append({"key": k, "shape": list(shape), "dtype": dtypes.name(ck.native_dtypes[k]), "status": status})
        deps = [
            {"key": k, "expected": _j(e), "found": _j(f), "what": w}
            for k, e, f, w in (departures(ck.shapes, cfg, ck.format) if cfg is not None else [])
        ]
        deps += [
            {"key": k, "expected": "finite values", "found": f"{n} NaN or infinite values", "what": "non-finite values"}
            for k, n in nonfinite.items()
        ]
        if cfg is None:
            deps.append(
                {
                    "key": None,
                    "expected": "a known variant",
                    "found": "unknown shapes",
                    "what": "config could not be determined; pass --config",
                }
            )
        n_params = int(sum(np.prod(s) for s in ck.shapes.values()))
        padding = (
            (cfg.hf_vocab_rows - cfg.text.vocab_size) * cfg.text.width
            if (cfg is not None and ck.format == "safetensors")
            else 0
        )
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
            "notes": list(ck.notes) + [VERIFIED if verify else NOT_READ],
            "data_verified": verify,
            "departures": deps,
            "conforms": not deps,
            "tensors_table": rows,
        }
        if cfg is not None:
            report["config_fields"] = cfg.to_dict()
            stored = sum(np.prod(s) * np.dtype(ck.native_dtypes[k]).itemsize for k, s in ck.shapes.items())
            report["memory"] = estimate.table(cfg, stored=float(stored) / max(n_params, 1))
        if ck.format == "safetensors" and cfg is not None:
            report["notes"].append(
                f"embed_tokens has {cfg.hf_vocab_rows} rows: {cfg.text.vocab_size} real + "
                f"{cfg.hf_vocab_rows - cfg.text.vocab_size} HF padding rows (dropped in npz)"
            )
        return report


def verify_data(ck, progress: Progress | None = None) -> dict[str, int]:
    """Read every byte of the checkpoint through its reader, checking the checksums it stores (npz CRC-32, ours
    in orbax: a mismatch is a CheckpointError, the file is corrupt; safetensors' offsets were checked when the
    header was read). Returns {key: count of NaN/inf values} for the tensors that have any (the spec's names)."""
    r = ck.tensors.reader
    names = {k: n for n, k in ck.tensors.names.items()}
    bad: dict[str, int] = {}
    total = sum(int(np.prod(r.shape(k))) * r.dtype(k).itemsize for k in r.keys())
    done = [0]

    def count(key: str, block: np.ndarray) -> None:
        n = int(block.size - np.count_nonzero(np.isfinite(block)))
        if n:
            bad[key] = bad.get(key, 0) + n
        done[0] += block.nbytes
        if progress:
            progress(done[0], total, key)

    for k in r.keys():
        scan(r, k, lambda b, k=k: count(names.get(k, k), b))
    r.verify_all()
    return bad


def _j(x):
    return list(x) if isinstance(x, tuple) else x
