"""Measure how far correct float32 training steps sit from each other and from float64: the figures the gradient
bounds of parity.compare.train_step (TRAIN_RULES) are set from.

    python benchmarks/train_step_calibration.py [-o benchmarks/results/train_step_calibration.json]

Sides, all on the same weights and training inputs (every leaf trainable): PyTorch float32, JAX float32, PyTorch
float64 (the float64 computation) and transformers float32 (under both presets: big_vision's step runs on
transformers' modules too, parity.hf_train); on the four tiny configs
(random weights, seed 1, and the shipped golden checkpoints) under both presets. Each float32 side is measured
against torch float32 and against float64, per group of points (forward, loss, activation gradients, parameter
gradients), as max_rel over the positions that reach the loss (parity.compare.train_step); leaves with an exactly-
zero true gradient (max |g| below NEAR_ZERO of the global scale) against the global gradient scale, as the
comparison judges them.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parity import hf_side, spec
from parity import points as pts
from parity.compare.stats import point_stats
from parity.compare.train_step import NEAR_ZERO, _valid
from parity.config import TINY_VARIANTS
from parity.conventions import PRESETS
from parity.jax_impl import api as jax_api
from parity.torch_impl import api as torch_api
from parity.training import TrainOptions


def train_inputs(cfg, seed: int = 0) -> dict[str, np.ndarray]:
    """Three rows: different prefix and suffix lengths, two of them right-padded; mask_loss on the real suffix."""
    rng = np.random.default_rng(seed)
    length, prefix, total = (14, 10, 12), (3, 6, 9), 14
    text = rng.integers(3, cfg.text.vocab_size, (3, total)).astype(np.int32)
    text[:, 0] = 2
    mask_ar, mask_input = np.zeros_like(text), np.zeros_like(text)
    for r in range(3):
        mask_ar[r, prefix[r] : length[r]] = 1
        mask_input[r, : length[r]] = 1
        text[r, length[r] :] = 0
    image = rng.uniform(-1, 1, (3, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
    return dict(image=image, text=text, mask_ar=mask_ar, mask_input=mask_input, mask_loss=mask_ar * mask_input)


def group(point: str) -> str:
    if point.startswith("train/"):
        return "loss"
    if point.endswith("/in") or point in (pts.GRAD_HEAD_IN, pts.GRAD_PROJECTOR):
        return "activation_grads"
    if point.startswith("grad/"):
        return "param_grads"
    return "forward"


def distances(ref: dict, other: dict, cfg, inputs, scale: float) -> dict[str, dict]:
    """Per group: the largest max_rel of `other` against `ref`, and at which point."""
    valid, text = _valid(cfg, inputs)
    out: dict[str, dict] = {}
    for name, a in ref.items():
        if name not in other:
            continue
        a64, b64 = np.asarray(a, np.float64), np.asarray(other[name], np.float64)
        s = point_stats(a64, b64, "float32", valid, False, None)
        rel = s.max_rel
        g = group(name)
        if g == "param_grads" and scale > 0 and np.abs(a64).max() < NEAR_ZERO * scale:
            rel, g = s.max_abs / scale, "near_zero_param_grads"
        if g not in out or rel > out[g]["max_rel"]:
            out[g] = {"max_rel": float(rel), "point": name}
    return out


def weight_sets():
    """(config name, config, what the weights are, canonical params): random weights (seed 1) for every tiny
    config, and the shipped golden checkpoints (their weights are larger: errors amplify more through depth)."""
    from converters.checkpoint import open_checkpoint

    root = Path(__file__).resolve().parents[1] / "golden"
    for name, cfg in TINY_VARIANTS.items():
        yield name, cfg, "random seed 1", spec.random_params(cfg, seed=1)
        for file in (root / f"{name}.npz", root / f"{name}.b16.npz"):
            if file.is_file():
                with open_checkpoint(str(file)) as ck:
                    params = {k: np.asarray(v, np.float32) for k, v in ck.load().items()}
                yield name, cfg, f"golden/{file.name}", params


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-o", "--output", default="benchmarks/results/train_step_calibration.json")
    args = ap.parse_args()
    options = TrainOptions(trainable=("all",))
    results = []
    for name, cfg, weights, params in weight_sets():
        inputs = train_inputs(cfg)
        for preset in ("big_vision", "transformers"):
            t0 = time.perf_counter()
            conv = PRESETS[preset]
            runs = {
                "torch": torch_api.train_points(torch_api.build_model(cfg, conv, params=params), inputs, options),
                "jax": jax_api.train_points(jax_api.build_model(cfg, conv, params=params), inputs, options),
                "float64": torch_api.train_points(
                    torch_api.build_model(cfg, conv, dtype="float64", params=params), inputs, options
                ),
            }
            runs["transformers"] = hf_side.train_points(hf_side.build_model(cfg, conv, params=params), inputs, options)
            leaf = [k for k in runs["float64"] if k.startswith("grad/") and group(k) == "param_grads"]
            scale = max(float(np.abs(runs["float64"][k]).max()) for k in leaf)
            row = {"config": name, "weights": weights, "preset": preset, "global_gradient_scale": scale}
            for side in [s for s in runs if s not in ("torch", "float64")]:
                row[f"{side}_vs_torch"] = distances(runs["torch"], runs[side], cfg, inputs, scale)
            for side in [s for s in runs if s != "float64"]:
                row[f"{side}_vs_float64"] = distances(runs["float64"], runs[side], cfg, inputs, scale)
            row["seconds"] = round(time.perf_counter() - t0, 1)
            results.append(row)
            print(json.dumps(row), flush=True)
    worst: dict[str, dict] = {}
    for row in results:
        for key, groups in row.items():
            if not key.endswith(("_vs_torch", "_vs_float64")):
                continue
            for g, v in groups.items():
                if g not in worst or v["max_rel"] > worst[g]["max_rel"]:
                    worst[g] = {**v, **{k: row[k] for k in ("config", "weights", "preset")}, "pair": key}
    doc = {"machine": platform.machine(), "largest": worst, "runs": results}
    Path(args.output).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(worst, indent=1))


if __name__ == "__main__":
    main()
