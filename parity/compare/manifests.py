"""What two runs' manifests say about a comparison: the fields that differ, whether the two sides saw the same
inputs under the same model and conventions, and which positions of the inputs are real (not padding)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from parity.config import PaliGemmaConfig
from parity.conventions import forward_fields
from parity.errors import ConfigError, InputsError, describe

# Manifest fields that always differ between two runs and say nothing about them.
_IGNORED = {
    "created",
    "seconds",
    "load_seconds",
    "run_seconds",
    "points",
    "tensors",
    "output",
    "warnings",
    "teacher_forced_from",
}  # what differs between any two runs, not what they mean


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def manifest_differences(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    fa = _flat({k: v for k, v in a.items() if k not in _IGNORED})
    fb = _flat({k: v for k, v in b.items() if k not in _IGNORED})
    fa.setdefault("precision", "highest"), fb.setdefault("precision", "highest")
    return [{"key": k, "a": fa.get(k), "b": fb.get(k)} for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def check_manifests(a: dict, b: dict, allow_convention_mismatch: bool) -> None:
    ia, ib = a.get("inputs", {}).get("sha256"), b.get("inputs", {}).get("sha256")
    if ia is None or ia != ib:
        raise InputsError(f"the two sides ran on different inputs: side A inputs sha256 {ia}, side B {ib}")
    if a.get("config") != b.get("config"):
        diff = [d["key"] for d in manifest_differences({"config": a.get("config")}, {"config": b.get("config")})]
        raise ConfigError(f"the two sides are different models: config fields {', '.join(diff[:6])} differ")
    ca, cb = forward_fields(a.get("conventions")), forward_fields(b.get("conventions"))  # training options aside
    if ca != cb and not allow_convention_mismatch:
        diff = list(manifest_differences({"c": ca}, {"c": cb}))
        raise ConfigError(
            "the two sides ran under different conventions ("
            + ", ".join(f"{d['key'][2:]}: {d['a']} vs {d['b']}" for d in diff)
            + "); pass --allow-convention-mismatch"
        )


def valid_mask(cfg: PaliGemmaConfig, manifest: dict, inputs: str | None) -> tuple[np.ndarray | None, str]:
    """bool[B, S] of the real (non-padding) positions, from the inputs file (given, or recorded in the manifest when
    it is still there with the same digest); None (every position compared) when there is none."""
    from parity.inputs import inputs_sha256, load_inputs

    path = inputs or manifest.get("inputs", {}).get("path")
    if not path or not os.path.isfile(path):
        return None, "all positions (inputs file not available: padding positions are compared too)"
    batch = load_inputs(path, cfg)
    if inputs_sha256(batch) != manifest["inputs"]["sha256"]:
        if inputs:
            raise InputsError(
                describe(
                    path,
                    "sha256",
                    manifest["inputs"]["sha256"],
                    inputs_sha256(batch),
                    "--inputs is not the inputs the sides ran on",
                )
            )
        return None, "all positions (the recorded inputs file has changed: padding positions are compared too)"
    b = batch["text"].shape[0]
    mask = np.concatenate([np.ones((b, cfg.num_image_tokens), bool), batch["mask_input"].astype(bool)], axis=1)
    return mask, f"real positions of {path}"
