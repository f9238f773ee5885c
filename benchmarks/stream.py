"""Block-streamed against resident runs on a real-size checkpoint: peak RSS and wall time of a capture, each in a
fresh process, and whether the two captures agree.

    python benchmarks/stream.py /work/big/pg2-3b-224.realistic.bf16.npz            # streamed, resident, streamed
    python benchmarks/stream.py CKPT --impl jax --streamed-only                       # a model too big to hold
    python benchmarks/stream.py CKPT --points 'logits,llm/layer*/out' --json         # one JSON object

Every run is `parity.run.capture` in a process of its own (`--dtype`, default float32 compute of whatever the file
stores; `PARITY_MEMORY_CHECK=off` so the resident run is not switched to streaming). Peak RSS is the child's VmHWM
(its own high-water mark, imports included; not ru_maxrss, which Linux carries over from a forking parent), wall
time is the child's whole run (imports, load, forward, writing). Order: streamed, resident, streamed again: the
first run warms the page cache, so the second streamed run is the warm-cache figure the target (streamed <= 1.3 x
resident) is about. Run a resident row of a 3B model only where ~20 GB are free.
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

CHILD = """
import json, sys, time
t0 = time.perf_counter()
from parity import run
m = run.capture(sys.argv[1], sys.argv[2], sys.argv[3], impl=sys.argv[4], dtype=sys.argv[5], points=sys.argv[6],
                stream=True if sys.argv[7] == "streamed" else None)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"peak": hwm * 1024, "wall": time.perf_counter() - t0, "load": m["load_seconds"],
                  "forward": m["run_seconds"], "execution": m.get("execution", "resident")}))
"""


def child(ckpt: str, inputs: str, out: str, impl: str, dtype: str, points: str, mode: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PARITY_MEMORY_CHECK": "off"}
    p = subprocess.run(
        [sys.executable, "-c", CHILD, ckpt, inputs, out, impl, dtype, points, mode],
        capture_output=True,
        text=True,
        env=env,
    )
    if p.returncode != 0:
        raise SystemExit(f"{mode} run failed ({p.returncode}): {p.stderr.strip().splitlines()[-1:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def make_mid(path: str, depth: int) -> None:
    """A bf16 checkpoint of PaliGemma 2 3B-224's shapes with `depth` ViT and Gemma blocks (the same units, the full
    vocabulary; realistic weights from benchmarks/convert.py's generator) and its config sidecar."""
    import dataclasses

    import convert as gen

    from converters import dtypes
    from converters.config_source import sidecar_path
    from converters.npz_write import NpzWriter
    from parity import spec
    from parity.config import VARIANTS

    gen._heavy()
    base = VARIANTS["paligemma2-3b-224"]
    cfg = dataclasses.replace(
        base,
        vision=dataclasses.replace(base.vision, depth=depth),
        text=dataclasses.replace(base.text, depth=depth),
    ).with_name(f"pg2-3b-224-depth{depth}")
    rng = np.random.default_rng(0)
    with open(path + ".partial", "wb") as f:
        w = NpzWriter(f)
        for e in spec.entries(cfg):
            w.write(spec.NPZ_PREFIX + e.key, dtypes.BF16, e.shape, gen.member_chunks(e, rng, "realistic"))
        w.close()
    with open(sidecar_path(path), "w") as f:
        f.write(cfg.to_json())
    os.replace(path + ".partial", path)


def mem_available() -> int:
    return next(int(ln.split()[1]) * 1024 for ln in open("/proc/meminfo") if ln.startswith("MemAvailable:"))


def agreement(a: str, b: str) -> dict:
    """max |a - b| / max |a| per point over the two capture files, and how many points are bit-identical."""
    from parity.capture_file import read_capture

    ta, tb = read_capture(a)[0], read_capture(b)[0]
    worst, same = 0.0, 0
    for k, x in ta.items():
        d = float(np.max(np.abs(x.astype(np.float64) - tb[k]))) / max(float(np.max(np.abs(x))), 1e-30)
        worst, same = max(worst, d), same + (d == 0.0)
    return {"points": len(ta), "bit_identical": same, "worst_rel": worst}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--impl", default="torch", choices=["torch", "jax"])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--points", default="logits", help="Capture points (globs), as parity capture --points.")
    ap.add_argument("--text-len", type=int, default=16)
    ap.add_argument("--streamed-only", action="store_true", help="No resident run (a model too big to hold).")
    ap.add_argument(
        "--resident-needs", type=float, default=21.0, help="GB that must be available to start the resident run."
    )
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--make-mid",
        type=int,
        default=None,
        metavar="DEPTH",
        help="First write CKPT: PaliGemma 2 3B-224's shapes with DEPTH ViT and Gemma blocks (bf16), if absent.",
    )
    args = ap.parse_args()
    if args.make_mid and not os.path.exists(args.ckpt):
        sys.path.insert(0, str(ROOT / "benchmarks"))
        make_mid(args.ckpt, args.make_mid)

    from converters.checkpoint import open_checkpoint
    from parity import estimate
    from parity.inputs import save_inputs

    with open_checkpoint(args.ckpt) as ck:
        cfg = ck.config
    rng = np.random.default_rng(0)
    px = cfg.vision.image_size
    rows = {}
    with tempfile.TemporaryDirectory(prefix="parity-bench-stream-") as tmp:
        inputs = os.path.join(tmp, "in.npz")
        save_inputs(
            inputs,
            {
                "image": rng.uniform(-1, 1, (1, px, px, 3)).astype(np.float32),
                "text": np.concatenate(  # <bos>, then random tokens
                    [[[2]], rng.integers(3, cfg.text.vocab_size, (1, args.text_len - 1))], axis=1
                ).astype(np.int32),
                "mask_ar": np.zeros((1, args.text_len), np.int32),
            },
        )
        plan = ["streamed"] if args.streamed_only else ["streamed", "resident", "streamed"]
        outs = {}
        for n, mode in enumerate(plan):
            if mode == "resident" and (free := mem_available()) < args.resident_needs * 1e9:
                raise SystemExit(
                    f"resident run skipped: {free / 1e9:.1f} GB available, --resident-needs {args.resident_needs} GB "
                    f"(streamed so far: {json.dumps(rows)})"
                )
            out = os.path.join(tmp, f"{mode}{n}.safetensors")
            t0 = time.perf_counter()
            r = child(args.ckpt, inputs, out, args.impl, args.dtype, args.points, mode)
            r["outer_wall"] = time.perf_counter() - t0
            rows[f"{mode}{'' if n < 2 else ' (warm)'}"] = r
            outs[mode] = out
            print(f"{mode}: {json.dumps(r)}", file=sys.stderr)
        unit = estimate.largest_unit(cfg) * estimate.ITEMSIZE[args.dtype]
        report = {
            "checkpoint": args.ckpt,
            "config": cfg.name,
            "impl": args.impl,
            "dtype": args.dtype,
            "points": args.points,
            "text_len": args.text_len,
            "largest_unit_bytes": unit,
            "target_peak_bytes": int(1e9 + 2 * unit),
            "runs": rows,
        }
        if not args.streamed_only:
            warm, res = rows["streamed (warm)"], rows["resident"]
            report["ratios"] = {"peak": warm["peak"] / res["peak"], "wall": warm["wall"] / res["wall"]}
            report["agreement"] = agreement(outs["resident"], outs["streamed"])
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"{cfg.name}, {args.impl} {args.dtype}, points {args.points}, 1 x {cfg.num_image_tokens + args.text_len} tokens"
    )
    print(f"target peak (1 GB + 2 x largest unit {unit / 1e9:.2f} GB): {report['target_peak_bytes'] / 1e9:.2f} GB")
    for name, r in rows.items():
        print(
            f"  {name:16s} peak {r['peak'] / 1e9:6.2f} GB  wall {r['wall']:7.1f} s  "
            f"(load {r['load']} s, forward {r['forward']} s)"
        )
    if "ratios" in report:
        print(f"  streamed/resident: peak x{report['ratios']['peak']:.3f}, wall x{report['ratios']['wall']:.3f}")
        print(f"  agreement: {report['agreement']}")


if __name__ == "__main__":
    main()
