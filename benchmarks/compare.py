"""What a layer-by-layer comparison costs against the two plain forward passes it is made of.

    python benchmarks/compare.py [--vision-depth 4 --text-depth 4] [--json]

PaliGemma 2 3B-224 shapes (widths, heads, 257152-row vocabulary, 256 image tokens) at reduced depth with random
float32 weights (benchmarks/pg2_shapes.py), on CPU, two rows of text. Sides: transformers (eager) and our PyTorch
implementation, transformers convention.

  plain       two processes, each loading the checkpoint and running one forward pass that keeps only the logits
              (parity.run.capture with points="logits"), one after the other
  compare     `parity compare CKPT --a transformers --b torch --inputs IN --layer-by-layer`: the same two processes
              capturing every point to disk, then the statistics of every point (float64, streamed)
  ratio       compare / plain (the goal: <= 1.3)
Also in one process, without loading: each forward pass with and without capturing every point, and the time of
the statistics alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pg2_shapes import WEIGHTS, batch, random_weights, reduced_pg2_3b  # noqa: E402

from converters.checkpoint import sidecar_path  # noqa: E402
from parity import spec  # noqa: E402
from parity.inputs import save_inputs  # noqa: E402


def wall(cmd: list[str], ok=(0,)) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if p.returncode not in ok:
        raise SystemExit(f"{' '.join(cmd[:4])}... failed ({p.returncode}): {p.stderr[-1000:]}")
    return time.perf_counter() - t0


def plain_cmd(ckpt: str, inputs: str, impl: str, out: str) -> list[str]:
    code = (
        f"from parity.run import capture; capture({ckpt!r}, {inputs!r}, {out!r}, impl={impl!r}, "
        f"convention='transformers', points='logits', overwrite=True)"
    )
    return [sys.executable, "-c", code]


def in_process(cfg, params, inputs) -> dict[str, float]:
    """Forward times with and without capture (fastest of 2), and the statistics alone."""
    from parity import hf_side, points
    from parity.compare.stats import point_stats
    from parity.conventions import PRESETS
    from parity.torch_impl import api

    out, caps = {}, {}
    for name, mod in (("transformers", hf_side), ("torch", api)):
        model = mod.build_model(cfg, PRESETS["transformers"], params=params)
        for what, pts_ in (("plain", None), ("capture", points.forward_points(cfg))):
            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                got = mod.forward(model, inputs, pts_)
                times.append(time.perf_counter() - t0)
            out[f"{name}_{what}_s"] = min(times)
        caps[name] = got
        del model
    valid = np.concatenate([np.ones((2, cfg.num_image_tokens), bool), inputs["mask_input"].astype(bool)], 1)
    text = valid.copy()
    text[:, : cfg.num_image_tokens] = False
    t0 = time.perf_counter()
    for p in points.forward_points(cfg):
        point_stats(caps["transformers"][p], caps["torch"][p], "float32", valid, p == points.LOGITS, text)
    out["statistics_s"] = time.perf_counter() - t0
    plain = out["transformers_plain_s"] + out["torch_plain_s"]
    out["in_process_ratio"] = (out["transformers_capture_s"] + out["torch_capture_s"] + out["statistics_s"]) / plain
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vision-depth", type=int, default=4)
    ap.add_argument("--text-depth", type=int, default=4)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--weights", choices=WEIGHTS, default="realistic", help="synthetic weights (pg2_shapes)")
    args = ap.parse_args()
    cfg = reduced_pg2_3b(args.vision_depth, args.text_depth)
    params = random_weights(cfg, weights=args.weights)
    inputs = batch(cfg)
    with tempfile.TemporaryDirectory(prefix="parity-bench-") as d:
        ckpt, inp = os.path.join(d, "ckpt.npz"), os.path.join(d, "in.npz")
        np.savez(ckpt, **{spec.NPZ_PREFIX + k: v for k, v in params.items()})
        Path(sidecar_path(ckpt)).write_text(cfg.to_json())  # a reduced depth is no released variant
        save_inputs(inp, inputs)
        report = {
            "config": cfg.name,
            "device": "cpu",
            "dtype": "float32",
            "sides": "transformers vs torch",
            **in_process(cfg, params, inputs),
        }
        del params
        out = os.path.join(d, "plain.safetensors")
        report["plain_s"] = sum(wall(plain_cmd(ckpt, inp, impl, out)) for impl in ("transformers", "torch"))
        report["compare_s"] = wall(
            [
                sys.executable,
                "-m",
                "parity.cli",
                "compare",
                ckpt,
                "--a",
                "transformers",
                "--b",
                "torch",
                "--inputs",
                inp,
                "--layer-by-layer",
                "--json",
            ],
            ok=(0, 1),
        )
    report["ratio"] = report["compare_s"] / report["plain_s"]
    report = {k: round(v, 3) if isinstance(v, float) else v for k, v in report.items()}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for k, v in report.items():
            print(f"{k:24s} {v}")


if __name__ == "__main__":
    main()
