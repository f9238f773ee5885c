"""The JAX implementation beside the PyTorch one: jitted forward (prefill) and greedy generation, same weights.

    python benchmarks/jax_forward.py                 # CPU: a reduced PaliGemma 2 shape (torch_forward.py's), float32
    python benchmarks/jax_forward.py --device gpu    # PaliGemma 2 3B-224 in bf16, random weights made on the GPU
    ... --json                                       # one JSON object instead of the table

Ratios are jax / torch (time: lower is better; tokens/s: higher is better). Steady-state times are the fastest of
--repeat calls after a warm-up; jax's compile time (first call minus a steady call) is reported separately. Decode
tokens/s = batch * (N - 1) / (generate(N) - generate(1)), every row decoding N tokens (ignore_eos). On a GPU only
jax runs (torch on CUDA is torch_forward.py's job); the device is named in the output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
# Two runtimes in one process: torch's OpenMP threads would otherwise spin after each op and starve XLA's.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax
import jax.numpy as jnp
from flax import nnx

from parity import (
    points,
    spec,
)
from parity.config import VARIANTS, PaliGemmaConfig
from parity.conventions import PRESETS
from parity.jax_impl import api
from parity.jax_impl.generate import generate as jax_generate

GPU_CONFIG = VARIANTS["paligemma2-3b-224"]


def timed(fn, repeat: int) -> tuple[float, float]:
    """(first call, fastest of `repeat` further calls); fn blocks until its result is ready."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, min(times)


def make_inputs(cfg: PaliGemmaConfig, batch: int, text_len: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    text = rng.integers(3, cfg.text.vocab_size, (batch, text_len)).astype(np.int32)
    text[:, 0] = 2
    res = cfg.vision.image_size
    return dict(
        image=rng.uniform(-1, 1, (batch, res, res, 3)).astype(np.float32),
        text=text,
        mask_ar=np.zeros_like(text),
        mask_input=np.ones_like(text),
    )


def random_on_device(model: api.Model, seed: int = 0, scale: float = 0.02) -> api.Model:
    """The same model with normal(0, scale) weights generated where its parameters live (no host transfer)."""
    leaves, treedef = jax.tree.flatten(model.state)
    shapes = [(x.shape, x.dtype) for x in leaves]

    @jax.jit
    def make(key):
        keys = jax.random.split(key, len(shapes))
        return [jax.random.normal(k, s, d) * jnp.asarray(scale, d) for k, (s, d) in zip(keys, shapes)]

    state = jax.tree.unflatten(treedef, make(jax.random.key(seed)))
    return api.Model(nnx.merge(model.graphdef, state), model.dtype, model.device, model.precision, model.mesh)


def bench(device: str, new_tokens: int, batches: list[int], repeat: int, cfg: PaliGemmaConfig | None = None) -> dict:
    gpu = not device.startswith("cpu")
    from torch_forward import CPU_CONFIG, TEXT_LEN  # the torch benchmark's CPU shape, for comparable figures

    cfg = cfg or (GPU_CONFIG if gpu else CPU_CONFIG)
    dtype = "bfloat16" if gpu else "float32"
    conv = PRESETS["transformers"]
    params = None if gpu else spec.random_params(cfg, seed=0, scale=0.05)
    ours = api.build_model(cfg, conv, dtype=dtype, device=device, params=params)
    if gpu:
        ours = random_on_device(ours)
    theirs = None
    if not gpu:
        import torch

        from parity.torch_impl import build_model as torch_build
        from parity.torch_impl.generate import generate as torch_generate

        theirs = torch_build(cfg, conv, dtype=dtype, params=params)
    res = {
        "device": api.device_description(device),
        "config": cfg.name,
        "dtype": dtype,
        "jax": jax.__version__,
        "prompt_tokens": cfg.num_image_tokens + TEXT_LEN,
        "new_tokens": new_tokens,
        "rows": [],
    }
    for b in batches:
        x = make_inputs(cfg, b, TEXT_LEN)
        jx = api._batch(ours, x)
        row = {"batch": b}

        def fwd():
            with jax.default_matmul_precision(ours.precision):
                jax.block_until_ready(api._forward(ours.graphdef, ours.state, jx, (points.LOGITS,)))

        def gen(n):
            with jax.default_matmul_precision(ours.precision):
                g = jax_generate(
                    ours.module,
                    jx["image"],
                    jx["text"],
                    jx["mask_ar"],
                    jx["mask_input"],
                    max_new_tokens=n,
                    ignore_eos=True,
                )
            return jax.block_until_ready(g.tokens)

        first, row["prefill_jax_s"] = timed(fwd, repeat)
        row["compile_forward_jax_s"] = first - row["prefill_jax_s"]
        gen_first = {}
        times = {}
        for n in (1, new_tokens):
            gen_first[n], times[n] = timed(lambda n=n: gen(n), repeat)
        row["compile_jax_s"] = row["compile_forward_jax_s"] + sum(gen_first[n] - times[n] for n in times)
        row["generate_jax_s"] = times[new_tokens]
        dt = times[new_tokens] - times[1]
        row["decode_tok_s_jax"] = b * (new_tokens - 1) / dt if dt > 0 else float("nan")
        row["tokens_agree"] = None
        if theirs is not None:
            t = {k: torch.as_tensor(v) if k == "image" else torch.as_tensor(v).long() for k, v in x.items()}
            with torch.inference_mode():
                _, row["prefill_torch_s"] = timed(
                    lambda: theirs(t["image"], t["text"], t["mask_ar"], t["mask_input"]), repeat
                )
                run = lambda n: torch_generate(
                    theirs,
                    t["image"],
                    t["text"],
                    t["mask_ar"],
                    t["mask_input"],
                    max_new_tokens=n,
                    ignore_eos=True,
                )
                tt = {n: timed(lambda n=n: run(n), repeat)[1] for n in (1, new_tokens)}
                row["tokens_agree"] = bool(np.array_equal(run(new_tokens).tokens.numpy(), np.asarray(gen(new_tokens))))
            row["generate_torch_s"] = tt[new_tokens]
            dt = tt[new_tokens] - tt[1]
            row["decode_tok_s_torch"] = b * (new_tokens - 1) / dt if dt > 0 else float("nan")
            row["prefill_ratio"] = row["prefill_jax_s"] / row["prefill_torch_s"]
            row["generate_ratio"] = row["generate_jax_s"] / row["generate_torch_s"]
            row["decode_speedup"] = row["decode_tok_s_jax"] / row["decode_tok_s_torch"]
        res["rows"].append(row)
    return res


def table(res: dict) -> str:
    lines = [
        f"{res['config']} on {res['device']} ({res['dtype']}, jax {res['jax']}), prompt {res['prompt_tokens']} "
        f"tokens, {res['new_tokens']} new tokens"
    ]
    cmp = res["rows"] and "prefill_torch_s" in res["rows"][0]
    head = f"{'batch':>5} {'prefill jax':>11} {'gen jax':>9} {'tok/s jax':>10} {'compile':>8}"
    if cmp:
        head += f" {'prefill torch':>13} {'ratio':>6} {'gen torch':>9} {'ratio':>6} {'tok/s torch':>11}  tokens agree"
    lines.append(head)
    for r in res["rows"]:
        line = (
            f"{r['batch']:>5} {r['prefill_jax_s'] * 1e3:>9.1f}ms {r['generate_jax_s']:>8.3f}s "
            f"{r['decode_tok_s_jax']:>10.1f} {r['compile_jax_s']:>7.2f}s"
        )
        if cmp:
            line += (
                f" {r['prefill_torch_s'] * 1e3:>11.1f}ms {r['prefill_ratio']:>6.2f} {r['generate_torch_s']:>8.3f}s "
                f"{r['generate_ratio']:>6.2f} {r['decode_tok_s_torch']:>11.1f}  {r['tokens_agree']}"
            )
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu (default), gpu[:N] or tpu[:N]")
    ap.add_argument("--new-tokens", type=int, default=None, help="default: 32 on CPU, 64 on an accelerator")
    ap.add_argument("--repeat", type=int, default=None, help="timed repeats, fastest kept (default: 9 CPU, 5 else)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    device = api.resolve_device(a.device)
    acc = not device.startswith("cpu")
    res = bench(device, a.new_tokens or (64 if acc else 32), [1, 8] if acc else [1, 4], a.repeat or (5 if acc else 9))
    print(json.dumps(res, indent=2) if a.json else table(res))


if __name__ == "__main__":
    main()
