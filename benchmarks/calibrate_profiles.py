"""Measure what each precision does to every capture point, against PyTorch float32 on CPU: the figures the
tolerance profiles of parity.compare.tolerances are set from (README, "Tolerance profiles").

    python benchmarks/calibrate_profiles.py [--vision-depth 4 --text-depth 4] [-o benchmarks/results/...json]

Sides, all on the same weights and inputs (transformers convention, so transformers can be one of them):
  transformers float32 (an independent float32 implementation: the fp32 profile), PyTorch bfloat16 weights and
  activations (bf16), PyTorch float16 (f16). Models: PaliGemma 2 3B-224 shapes at reduced depth with random weights
  (benchmarks/pg2_shapes.py) and every tiny variant. Per point: max_rel, rms_rel; logits also kl_max and top1, and
  max_rel on the last real position of each row (the issue's reference figure).
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pg2_shapes import WEIGHTS, batch, random_weights, reduced_pg2_3b

from parity import hf_side, points, spec
from parity.compare.stats import point_stats
from parity.config import TINY_VARIANTS
from parity.conventions import PRESETS
from parity.torch_impl import api

SIDES = {"fp32": ("transformers", "float32"), "bf16": ("torch", "bfloat16"), "f16": ("torch", "float16")}


def run(impl, cfg, dtype, params, inputs):
    mod = hf_side if impl == "transformers" else api
    model = mod.build_model(cfg, PRESETS["transformers"], dtype=dtype, params=params)
    out = mod.forward(model, inputs, points.forward_points(cfg))
    del model
    return out


def measure(cfg, params, inputs) -> dict:
    valid = np.concatenate(
        [np.ones((inputs["text"].shape[0], cfg.num_image_tokens), bool), inputs["mask_input"].astype(bool)], 1
    )
    last = valid.shape[1] - 1 - np.argmax(valid[:, ::-1], 1)
    ref = run("torch", cfg, "float32", params, inputs)
    result = {}
    for profile, (impl, dtype) in SIDES.items():
        t0 = time.perf_counter()
        got = run(impl, cfg, dtype, params, inputs)
        rows = {}
        for name in points.forward_points(cfg):
            s = point_stats(ref[name], got[name], dtype, valid, logits=name == points.LOGITS)
            rows[name] = {"max_rel": s.max_rel, "rms_rel": s.rms_rel}
            if name == points.LOGITS:
                a, b = ref[name][np.arange(len(last)), last], got[name][np.arange(len(last)), last]
                rows[name].update(
                    kl_max=s.kl_max,
                    top1=s.top1,
                    last_position_max_rel=float(np.abs(a.astype(np.float64) - b).max() / np.abs(a).max()),
                    last_position_max_abs_logit=float(np.abs(a).max()),
                )
        result[profile] = {"side": f"{impl} {dtype}", "seconds": round(time.perf_counter() - t0, 1), "points": rows}
        print(
            f"  {profile:5s} {impl} {dtype}: logits max_rel {rows['logits']['max_rel']:.2e}, last position "
            f"{rows['logits']['last_position_max_rel']:.2e}",
            file=sys.stderr,
        )
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vision-depth", type=int, default=4)
    ap.add_argument("--text-depth", type=int, default=4)
    ap.add_argument("--weights", choices=WEIGHTS, default="realistic", help="synthetic weights (pg2_shapes)")
    ap.add_argument("-o", "--output", default=str(Path(__file__).parent / "results" / "profile_calibration.json"))
    args = ap.parse_args()
    report = {"reference": "torch float32, CPU, transformers convention", "machine": platform.processor(), "models": {}}
    big = reduced_pg2_3b(args.vision_depth, args.text_depth)
    print(big.name, file=sys.stderr)
    report["models"][big.name] = measure(big, random_weights(big, weights=args.weights), batch(big))
    for name, cfg in TINY_VARIANTS.items():
        print(name, file=sys.stderr)
        report["models"][name] = measure(
            cfg, spec.random_params(cfg, seed=1, weights=args.weights), batch(cfg, lengths=(12, 9), prefix=(3, 6))
        )
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
