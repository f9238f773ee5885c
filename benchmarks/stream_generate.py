"""Block-streamed generation against resident on a real-size checkpoint: peak RSS, prefill time and time per decoded
token, each run in a fresh process, and whether the runs agree (tokens, step logits).

    python benchmarks/stream_generate.py /work/big/pg2-3b-224-depth4.realistic.bf16.npz --tokens 4
    python benchmarks/stream_generate.py CKPT --impl jax --streamed-only --json

Every run is `parity.run.generate` (greedy, --ignore-eos, float32 compute by default; PARITY_MEMORY_CHECK=off so the
resident run is not switched to streaming) in a process of its own. Peak RSS is the child's VmHWM; the prefill time
runs from the start of decoding to the first token, the time per token is the mean of the later decode steps (the
"decoding" progress ticks). Order: streamed, resident, streamed again (warm page cache). A streamed decode step reads
every Gemma block and the whole embedding table again: `bytes_per_token` is what it reads (as stored on disk).
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
ticks = []
def progress(stage, done, total):
    if stage == "decoding":
        ticks.append(time.perf_counter())
r = run.generate(sys.argv[1], sys.argv[2], int(sys.argv[3]), impl=sys.argv[4], dtype=sys.argv[5], output=sys.argv[6],
                 ignore_eos=True, progress=progress, stream=True if sys.argv[7] == "streamed" else None)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
m = r["manifest"]
steps = [b - a for a, b in zip(ticks, ticks[1:])]
print(json.dumps({"peak": hwm * 1024, "wall": time.perf_counter() - t0, "load": m["load_seconds"],
                  "generate": m["run_seconds"], "prefill": m["run_seconds"] - sum(steps),
                  "per_token": sum(steps) / len(steps) if steps else None, "tokens": r["rows"][0]["tokens"],
                  "execution": m.get("execution", "resident")}))
"""


def child(ckpt, inputs, n, impl, dtype, out, mode) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PARITY_MEMORY_CHECK": "off"}
    p = subprocess.run(
        [sys.executable, "-c", CHILD, ckpt, inputs, str(n), impl, dtype, out, mode],
        capture_output=True,
        text=True,
        env=env,
    )
    if p.returncode != 0:
        raise SystemExit(f"{mode} run failed ({p.returncode}): {p.stderr.strip().splitlines()[-3:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def per_token_bytes(ckpt: str) -> int:
    """Bytes a streamed decode step reads, as stored: every Gemma block, the final norm and the embedding table."""
    from converters.checkpoint import open_checkpoint

    with open_checkpoint(ckpt) as ck:
        return sum(int(np.prod(e.shape)) * ck.dtype(e).itemsize for e in ck.entries() if e.key.startswith("llm/"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt")
    ap.add_argument("--impl", default="torch")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--text-len", type=int, default=16)
    ap.add_argument("--streamed-only", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from converters.checkpoint import open_checkpoint
    from parity.capture_file import read_capture
    from parity.inputs import save_inputs

    with open_checkpoint(args.ckpt) as ck:
        cfg = ck.config
    rng = np.random.default_rng(0)
    px = cfg.vision.image_size
    rows, outs = {}, {}
    with tempfile.TemporaryDirectory(prefix="parity-bench-stream-generate-") as tmp:
        inputs = os.path.join(tmp, "in.npz")
        text = np.concatenate([[[2]], rng.integers(3, cfg.text.vocab_size, (1, args.text_len - 1))], axis=1)
        save_inputs(
            inputs,
            {
                "image": rng.uniform(-1, 1, (1, px, px, 3)).astype(np.float32),
                "text": text.astype(np.int32),
                "mask_ar": np.zeros((1, args.text_len), np.int32),
            },
        )
        plan = ["streamed"] if args.streamed_only else ["streamed", "resident", "streamed"]
        for n, mode in enumerate(plan):
            out = os.path.join(tmp, f"{mode}{n}.safetensors")
            t0 = time.perf_counter()
            r = child(args.ckpt, inputs, args.tokens, args.impl, args.dtype, out, mode)
            r["outer_wall"] = time.perf_counter() - t0
            rows[f"{mode}{'' if n < 2 else ' (warm)'}"] = r
            outs.setdefault(mode, out)
            print(f"{mode}: {json.dumps(r)}", file=sys.stderr)
        agree = None
        if "resident" in outs:
            a, b = read_capture(outs["resident"])[0], read_capture(outs["streamed"])[0]
            scale = float(np.abs(a["logits"]).max())
            agree = {
                "tokens_equal": bool((a["tokens"] == b["tokens"]).all()),
                "logits_max_abs": float(np.abs(a["logits"].astype(np.float64) - b["logits"]).max()),
                "logits_scale": scale,
            }
    report = {
        "checkpoint": args.ckpt,
        "config": cfg.name,
        "impl": args.impl,
        "dtype": args.dtype,
        "tokens": args.tokens,
        "text_len": args.text_len,
        "bytes_per_token": per_token_bytes(args.ckpt),
        "runs": rows,
        "agreement": agree,
    }
    print(json.dumps(report, indent=None if args.json else 1))


if __name__ == "__main__":
    main()
