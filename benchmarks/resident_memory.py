"""Peak memory and time of a resident capture (issue 24 §2): the loaders fill the framework's tensors block by block
(parity.param_blocks) instead of holding a numpy dict of the whole model beside them.

    python benchmarks/resident_memory.py CKPT [--impl torch,jax] [--mode new,old] [--dtype float32] [--json OUT]
    python benchmarks/resident_memory.py --small          # smoke run: a generated tiny checkpoint, both modes

Each run is one `parity.run.capture` (logits only, 1 row, 64 text tokens) in a fresh child process; its peak
resident set is the child's own VmHWM (as tests/test_estimate.py measures it: not ru_maxrss, which Linux carries
over from the forking parent), with the wall time of the whole capture and the manifest's load_seconds.
`--mode old` runs the same capture with the implementation's `loads_blocks` switched off, so the pipeline loads a
numpy dict (`Checkpoint.load`) and hands it to build_model: the second copy this work removed. At 3B float32 the old
mode peaks at ~20 GB (issue 24 measured 20.4 GB torch, 19.6 GB jax): run it only where that fits.
Reported against the target: peak <= 1.1 x the model in the compute dtype + the run's activations and outputs
(parity.estimate's "activations" + "outputs" items) + the framework's runtime (parity.estimate.RUNTIME).
Under the shared machine's rules a 3B run goes under `flock /work/wt/_notes/bigmem.lock`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CHILD = """
import importlib, json, sys, time
impl, mode, ckpt, inputs, out, dtype = sys.argv[1:7]
from parity import backend, run
if mode == "old":
    be = backend.get(impl)
    be.loads_blocks = False  # the pipeline then loads the numpy dict first (the code before issue 24 §2)
t0 = time.perf_counter()
m = run.capture(ckpt, inputs, out, impl=impl, dtype=dtype, overwrite=True)
wall = time.perf_counter() - t0
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"peak": hwm * 1024, "wall": wall, "load_seconds": m["load_seconds"]}))
"""
GB = 1e9


def inputs_file(cfg, path: str, text_len: int = 64) -> None:
    import numpy as np

    from parity.inputs import save_inputs

    rng = np.random.default_rng(0)
    text = rng.integers(3, cfg.text.vocab_size, (1, text_len)).astype(np.int32)
    text[:, 0] = 2
    mask_ar = np.zeros_like(text)
    mask_ar[:, text_len // 2 :] = 1
    s = cfg.vision.image_size
    save_inputs(path, {"image": rng.uniform(-1, 1, (1, s, s, 3)).astype(np.float32), "text": text, "mask_ar": mask_ar})


def measure(impl: str, mode: str, ckpt: str, inputs: str, dtype: str, workdir: str) -> dict:
    out = os.path.join(workdir, f"cap-{impl}-{mode}.safetensors")
    env = {**os.environ, "PYTHONPATH": ROOT, "PARITY_MEMORY_CHECK": "off"}
    p = subprocess.run(
        [sys.executable, "-c", CHILD, impl, mode, ckpt, inputs, out, dtype], capture_output=True, text=True, env=env
    )
    if p.returncode != 0:
        raise SystemExit(f"{impl} {mode}: exit {p.returncode}: {p.stderr.strip()[-2000:]}")
    os.remove(out)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", nargs="?")
    ap.add_argument("--small", action="store_true", help="a generated tiny-pg2-gqa checkpoint (smoke run)")
    ap.add_argument("--impl", default="torch,jax")
    ap.add_argument("--mode", default="new", help="comma-separated: new (block loading), old (numpy dict first)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args(argv)

    from converters.checkpoint import open_checkpoint
    from parity import estimate, spec

    with tempfile.TemporaryDirectory() as workdir:
        ckpt = args.checkpoint
        if args.small or not ckpt:
            import numpy as np

            from parity.config import TINY_VARIANTS

            ckpt = os.path.join(workdir, "tiny.npz")
            params = spec.random_params(TINY_VARIANTS["tiny-pg2-gqa"], scale=0.02)
            np.savez(ckpt, **{"params/" + k: v for k, v in params.items()})
            args.mode = "new,old"
        with open_checkpoint(ckpt) as ck:
            cfg = ck.config
            stored = os.path.getsize(ckpt)
        inputs = os.path.join(workdir, "in.npz")
        inputs_file(cfg, inputs)
        model = spec.param_count(cfg) * estimate.ITEMSIZE[args.dtype]
        result = {"checkpoint": os.path.basename(ckpt), "config": cfg.name, "dtype": args.dtype, "runs": []}
        result.update(model_bytes=model, checkpoint_bytes=stored, date=time.strftime("%Y-%m-%d"))
        print(f"{cfg.name} {args.dtype}: model {model / GB:.2f} GB, checkpoint {stored / GB:.2f} GB on disk")
        for impl in args.impl.split(","):
            e = estimate.estimate(cfg, impl, args.dtype, 1, 64, estimate.Work("capture"))
            extra = e.items["activations"] + e.items["outputs"] + estimate.RUNTIME[impl]
            target = 1.1 * model + extra
            for mode in args.mode.split(","):
                r = measure(impl, mode, ckpt, inputs, args.dtype, workdir)
                r.update(impl=impl, mode=mode, target=target, ratio_to_model=r["peak"] / model)
                result["runs"].append(r)
                print(
                    f"  {impl:5s} {mode}: peak {r['peak'] / GB:6.2f} GB ({r['ratio_to_model']:.2f} x model; target "
                    f"<= {target / GB:.2f} GB: {'met' if r['peak'] <= target else 'MISSED'}), wall {r['wall']:.1f} s "
                    f"(load {r['load_seconds']:.1f} s)",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
