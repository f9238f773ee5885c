"""Our PyTorch PaliGemma against transformers' (eager) on one config: forward (prefill) time and greedy decoding.

    python benchmarks/torch_forward.py                 # CPU, a reduced PaliGemma 2 shape, same weights in both
    python benchmarks/torch_forward.py --device cuda   # PaliGemma 2 3B-224 in bf16, random weights made on the GPU
    ... --json                                         # one JSON object instead of the table

Ratios are ours / transformers (time: lower is better; tokens/s: higher is better). The two implementations run
alternately, pair by pair (the order flipping each pair), so a load that comes and goes on a shared machine hits
both alike; each ratio is the median of the per-pair ratios with its spread (first and third quartiles), and the
verdict is "faster" or "slower" only when the whole spread lies on one side of 1.0, "inconclusive" otherwise.
Decode throughput comes from generate(N) - generate(1) per pair; when noise makes that difference non-positive it is
reported as unmeasured (null), never as nan. On CUDA our decode step runs under torch.compile(mode="reduce-overhead")
(CUDA graphs), falling back to eager if compiling fails; the path that ran is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converters.hf_config import to_hf_config
from parity import spec
from parity.config import VARIANTS, PaliGemmaConfig, TextConfig, VisionConfig
from parity.conventions import PRESETS
from parity.torch_impl import build_model
from parity.torch_impl.generate import generate

# A reduced PaliGemma 2 shape: every feature (GQA, N*H != D, post-norms, softcaps, sliding window), CPU-sized.
CPU_CONFIG = PaliGemmaConfig(
    "bench-pg2-small",
    VisionConfig(width=256, depth=4, mlp_dim=1024, num_heads=4, patch_size=14, image_size=112),
    TextConfig(
        width=384,
        depth=6,
        mlp_dim=1536,
        num_heads=8,
        num_kv_heads=4,
        head_dim=64,
        vocab_size=16_384,
        gemma2=True,
        attn_softcap=50.0,
        final_softcap=30.0,
        sliding_window=48,
    ),
)
TEXT_LEN = 18
_RENAMES = (
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("language_model.model.", "model.language_model."),
)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def once(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def paired(ours, theirs, device: str, repeat: int) -> tuple[list[float], list[float]]:
    """`repeat` timings of each, alternating ours/theirs and flipping the order every pair, after one warm-up."""
    ours(), theirs()
    a, b = [], []
    for i in range(repeat):
        if i % 2 == 0:
            a.append(once(ours, device))
            b.append(once(theirs, device))
        else:
            b.append(once(theirs, device))
            a.append(once(ours, device))
    return a, b


def ratio_summary(ratios: list[float]) -> dict:
    """Median and quartiles of per-pair ratios; verdict only when the interquartile range excludes 1.0."""
    if len(ratios) >= 2:
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    else:
        q1 = q3 = ratios[0]
    verdict = "faster" if q3 < 1.0 else "slower" if q1 > 1.0 else "inconclusive"
    return {"median": statistics.median(ratios), "q1": q1, "q3": q3, "verdict": verdict, "pairs": len(ratios)}


def make_inputs(cfg: PaliGemmaConfig, batch: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, cfg.text.vocab_size, (batch, TEXT_LEN), generator=g)
    text[:, 0] = 2
    mask_ar = torch.zeros_like(text)
    res = cfg.vision.image_size
    image = torch.rand(batch, res, res, 3, generator=g) * 2 - 1
    return {
        k: v.to(device)
        for k, v in dict(image=image, text=text, mask_ar=mask_ar, mask_input=torch.ones_like(text)).items()
    }


def hf_inputs(cfg: PaliGemmaConfig, x: dict[str, torch.Tensor], dtype) -> dict[str, torch.Tensor]:
    b, t = x["text"].shape[0], cfg.num_image_tokens
    img = torch.full((b, t), cfg.image_token_id, dtype=torch.long, device=x["text"].device)
    return dict(
        input_ids=torch.cat([img, x["text"]], 1),
        pixel_values=x["image"].permute(0, 3, 1, 2).contiguous().to(dtype),
        attention_mask=torch.cat([torch.ones_like(img), x["mask_input"]], 1),
        token_type_ids=torch.cat([torch.zeros_like(img), x["mask_ar"]], 1),
    )


def build_hf(cfg: PaliGemmaConfig, dtype, device: str, params=None):
    import transformers

    d = to_hf_config(cfg, dtype={torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype])
    d.pop("parity_config")
    hc = transformers.PaliGemmaConfig(**d)
    for c in (hc, hc.text_config, hc.vision_config):
        c._attn_implementation = "eager"
    with torch.device(device):
        model = transformers.PaliGemmaForConditionalGeneration(hc).to(dtype).eval()
    if params is not None:
        state = {}
        for key, x in spec.to_hf(cfg, params).items():
            for old, new in _RENAMES:
                key = new + key[len(old) :] if key.startswith(old) else key
            state[key] = torch.from_numpy(np.ascontiguousarray(x))
        model.load_state_dict(state, strict=False)
        model.tie_weights()
    return model


def build_ours(cfg: PaliGemmaConfig, dtype: str, device: str, params=None):
    model = build_model(cfg, PRESETS["transformers"], dtype=dtype, device=device, params=params)
    if params is None:  # random weights made where the model lives: no host transfer
        g = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.02, generator=g)
    return model


def bench(device: str, new_tokens: int, batches: list[int], repeat: int, cfg: PaliGemmaConfig | None = None) -> dict:
    cuda = device == "cuda"
    cfg = cfg or (VARIANTS["paligemma2-3b-224"] if cuda else CPU_CONFIG)
    dtype = torch.bfloat16 if cuda else torch.float32
    params = None if cuda else spec.random_params(cfg, seed=0, scale=0.05)
    ours = build_ours(cfg, "bfloat16" if cuda else "float32", device, params)
    theirs = build_hf(cfg, dtype, device, params)
    compile_mode = "reduce-overhead" if cuda else None
    res = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "config": cfg.name,
        "dtype": str(dtype),
        "prompt_tokens": cfg.num_image_tokens + TEXT_LEN,
        "new_tokens": new_tokens,
        "repeat": repeat,
        "rows": [],
    }
    with torch.inference_mode():
        for b in batches:
            x = make_inputs(cfg, b, device)
            hx = hf_inputs(cfg, x, dtype)
            row = {"batch": b}
            fwd = (lambda: ours(x["image"], x["text"], x["mask_ar"], x["mask_input"]), lambda: theirs(**hx))
            po, ph = paired(*fwd, device, repeat)
            row["prefill_ours_s"], row["prefill_hf_s"] = statistics.median(po), statistics.median(ph)
            row["prefill_ratio"] = ratio_summary([a / c for a, c in zip(po, ph)])
            run = lambda n: generate(
                ours,
                x["image"],
                x["text"],
                x["mask_ar"],
                x["mask_input"],
                max_new_tokens=n,
                eos_id=-1,
                compile=compile_mode,
            )
            t0 = time.perf_counter()
            first = run(new_tokens)  # includes compiling on CUDA
            sync(device)
            row["first_generate_s"] = time.perf_counter() - t0
            row["decode_path"] = first.decode_path
            hf_run = lambda n: theirs.generate(
                **hx,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
            go, gh = paired(lambda: run(new_tokens), lambda: hf_run(new_tokens), device, repeat)
            o1, h1 = paired(lambda: run(1), lambda: hf_run(1), device, repeat)
            hf_tokens = hf_run(new_tokens)[:, hx["input_ids"].shape[1] :]
            row["tokens_agree"] = bool(torch.equal(first.tokens.cpu(), hf_tokens.cpu())) if not cuda else None
            row["generate_ours_s"], row["generate_hf_s"] = statistics.median(go), statistics.median(gh)
            row["generate_ratio"] = ratio_summary([a / c for a, c in zip(go, gh)])
            steps = b * (new_tokens - 1)  # decoded tokens after the prefill token: generate(N) - generate(1)
            rates = {}
            for name, n_runs, one_runs in (("ours", go, o1), ("hf", gh, h1)):
                dt = statistics.median(n_runs) - statistics.median(one_runs)
                rates[name] = steps / dt if dt > 0 else None  # None: noise swallowed the decode time
                row[f"decode_tok_s_{name}"] = rates[name]
            pair = [(a - a1) / (c - c1) for a, a1, c, c1 in zip(go, o1, gh, h1) if a > a1 and c > c1]
            row["decode_ratio"] = ratio_summary(pair) if pair else None  # decode time per token, ours / hf
            res["rows"].append(row)
    return res


def _ratio(r: dict | None) -> str:
    if r is None:
        return "unmeasured"
    return f"{r['median']:.2f} [{r['q1']:.2f}-{r['q3']:.2f}] {r['verdict']}"


def _rate(x: float | None) -> str:
    return "unmeasured" if x is None else f"{x:.1f}"


def table(res: dict) -> str:
    lines = [
        f"{res['config']} on {res['device']} ({res['dtype']}), prompt {res['prompt_tokens']} tokens, "
        f"{res['new_tokens']} new tokens; ours / transformers, median [quartiles] of {res['repeat']} "
        f"alternating pairs"
    ]
    for r in res["rows"]:
        agree = "" if r["tokens_agree"] is None else f"; tokens agree: {r['tokens_agree']}"
        lines += [
            f"batch {r['batch']}:",
            f"  prefill   {r['prefill_ours_s'] * 1e3:8.1f} ms vs {r['prefill_hf_s'] * 1e3:8.1f} ms  "
            f"ratio {_ratio(r['prefill_ratio'])}",
            f"  generate  {r['generate_ours_s']:8.3f} s  vs {r['generate_hf_s']:8.3f} s   "
            f"ratio {_ratio(r['generate_ratio'])}",
            f"  decode    {_rate(r['decode_tok_s_ours'])} vs {_rate(r['decode_tok_s_hf'])} tok/s  "
            f"time ratio {_ratio(r['decode_ratio'])}  ({r['decode_path']}{agree})",
        ]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--new-tokens", type=int, default=None, help="default: 32 on CPU, 64 on CUDA")
    ap.add_argument(
        "--repeat", type=int, default=None, help="alternating pairs per measurement (default: 9 on CPU, 5 on CUDA)"
    )
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    cuda = a.device == "cuda"
    torch.manual_seed(0)
    res = bench(
        a.device, a.new_tokens or (64 if cuda else 32), [1, 8] if cuda else [1, 4], a.repeat or (5 if cuda else 9)
    )
    print(json.dumps(res, indent=2) if a.json else table(res))


if __name__ == "__main__":
    main()
