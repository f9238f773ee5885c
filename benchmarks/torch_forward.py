"""Our PyTorch PaliGemma against transformers' (eager) on one config: forward (prefill) time and greedy decoding.

    python benchmarks/torch_forward.py                 # CPU, a reduced PaliGemma 2 shape, same weights in both
    python benchmarks/torch_forward.py --device cuda   # PaliGemma 2 3B-224 in bf16, random weights made on the GPU
    ... --json                                         # one JSON object instead of the table

Ratios are ours / transformers (time: lower is better; tokens/s: higher is better). On CUDA our decode step runs
under torch.compile(mode="reduce-overhead") (CUDA graphs), falling back to eager if compiling fails; the path that
ran is reported.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converters.hf_config import to_hf_config  # noqa: E402
from parity import spec  # noqa: E402
from parity.config import VARIANTS, PaliGemmaConfig, TextConfig, VisionConfig  # noqa: E402
from parity.conventions import PRESETS  # noqa: E402
from parity.torch_impl import build_model  # noqa: E402
from parity.torch_impl.generate import generate  # noqa: E402

# A reduced PaliGemma 2 shape: every feature (GQA, N*H != D, post-norms, softcaps, sliding window), CPU-sized.
CPU_CONFIG = PaliGemmaConfig(
    "bench-pg2-small", VisionConfig(width=256, depth=4, mlp_dim=1024, num_heads=4, patch_size=14, image_size=112),
    TextConfig(width=384, depth=6, mlp_dim=1536, num_heads=8, num_kv_heads=4, head_dim=64, vocab_size=16_384,
               gemma2=True, attn_softcap=50.0, final_softcap=30.0, sliding_window=48))
TEXT_LEN = 18
_RENAMES = (("vision_tower.vision_model.", "model.vision_tower."),
            ("multi_modal_projector.", "model.multi_modal_projector."),
            ("language_model.model.", "model.language_model."))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int) -> float:
    """Fastest of `repeat` calls after one warm-up call (the minimum resists noise from other processes)."""
    fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def make_inputs(cfg: PaliGemmaConfig, batch: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, cfg.text.vocab_size, (batch, TEXT_LEN), generator=g)
    text[:, 0] = 2
    mask_ar = torch.zeros_like(text)
    res = cfg.vision.image_size
    image = torch.rand(batch, res, res, 3, generator=g) * 2 - 1
    return {k: v.to(device) for k, v in dict(image=image, text=text, mask_ar=mask_ar,
                                             mask_input=torch.ones_like(text)).items()}


def hf_inputs(cfg: PaliGemmaConfig, x: dict[str, torch.Tensor], dtype) -> dict[str, torch.Tensor]:
    b, t = x["text"].shape[0], cfg.num_image_tokens
    img = torch.full((b, t), cfg.image_token_id, dtype=torch.long, device=x["text"].device)
    return dict(input_ids=torch.cat([img, x["text"]], 1),
                pixel_values=x["image"].permute(0, 3, 1, 2).contiguous().to(dtype),
                attention_mask=torch.cat([torch.ones_like(img), x["mask_input"]], 1),
                token_type_ids=torch.cat([torch.zeros_like(img), x["mask_ar"]], 1))


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
                key = new + key[len(old):] if key.startswith(old) else key
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


def bench(device: str, new_tokens: int, batches: list[int], repeat: int, cfg: PaliGemmaConfig | None = None
          ) -> dict:
    cuda = device == "cuda"
    cfg = cfg or (VARIANTS["paligemma2-3b-224"] if cuda else CPU_CONFIG)
    dtype = torch.bfloat16 if cuda else torch.float32
    params = None if cuda else spec.random_params(cfg, seed=0, scale=0.05)
    ours = build_ours(cfg, "bfloat16" if cuda else "float32", device, params)
    theirs = build_hf(cfg, dtype, device, params)
    compile_mode = "reduce-overhead" if cuda else None
    res = {"device": torch.cuda.get_device_name() if cuda else "cpu", "config": cfg.name, "dtype": str(dtype),
           "prompt_tokens": cfg.num_image_tokens + TEXT_LEN, "new_tokens": new_tokens, "rows": []}
    with torch.inference_mode():
        for b in batches:
            x = make_inputs(cfg, b, device)
            hx = hf_inputs(cfg, x, dtype)
            row = {"batch": b}
            row["prefill_ours_s"] = timed(lambda: ours(x["image"], x["text"], x["mask_ar"], x["mask_input"]),
                                          device, repeat)
            row["prefill_hf_s"] = timed(lambda: theirs(**hx), device, repeat)
            run = lambda n: generate(ours, x["image"], x["text"], x["mask_ar"], x["mask_input"],  # noqa: E731
                                     max_new_tokens=n, eos_id=-1, compile=compile_mode)
            t0 = time.perf_counter()
            first = run(new_tokens)  # includes compiling on CUDA
            sync(device)
            row["first_generate_s"] = time.perf_counter() - t0
            row["decode_path"] = first.decode_path
            hf_run = lambda n: theirs.generate(**hx, max_new_tokens=n, min_new_tokens=n,  # noqa: E731
                                               do_sample=False, pad_token_id=0)
            times = {}
            for name, fn in (("ours", run), ("hf", hf_run)):
                times[name] = {n: timed(lambda: fn(n), device, repeat) for n in (1, new_tokens)}
            hf_tokens = hf_run(new_tokens)[:, hx["input_ids"].shape[1]:]
            row["tokens_agree"] = bool(torch.equal(first.tokens.cpu(), hf_tokens.cpu())) if not cuda else None
            row["generate_ours_s"], row["generate_hf_s"] = times["ours"][new_tokens], times["hf"][new_tokens]
            steps = new_tokens - 1  # decode steps after the prefill token: generate(N) - generate(1)
            for name in ("ours", "hf"):
                dt = times[name][new_tokens] - times[name][1]
                row[f"decode_tok_s_{name}"] = b * steps / dt if dt > 0 else float("nan")  # nan: too noisy
            row["prefill_ratio"] = row["prefill_ours_s"] / row["prefill_hf_s"]
            row["generate_ratio"] = row["generate_ours_s"] / row["generate_hf_s"]
            row["decode_speedup"] = row["decode_tok_s_ours"] / row["decode_tok_s_hf"]
            res["rows"].append(row)
    return res


def table(res: dict) -> str:
    lines = [f"{res['config']} on {res['device']} ({res['dtype']}), prompt {res['prompt_tokens']} tokens, "
             f"{res['new_tokens']} new tokens",
             f"{'batch':>5} {'prefill ours':>12} {'prefill hf':>10} {'ratio':>6} {'gen ours':>9} {'gen hf':>8} "
             f"{'ratio':>6} {'tok/s ours':>10} {'tok/s hf':>9}  decode path"]
    for r in res["rows"]:
        lines.append(f"{r['batch']:>5} {r['prefill_ours_s'] * 1e3:>10.1f}ms {r['prefill_hf_s'] * 1e3:>8.1f}ms "
                     f"{r['prefill_ratio']:>6.2f} {r['generate_ours_s']:>8.3f}s {r['generate_hf_s']:>7.3f}s "
                     f"{r['generate_ratio']:>6.2f} {r['decode_tok_s_ours']:>10.1f} {r['decode_tok_s_hf']:>9.1f}  "
                     f"{r['decode_path']}" + ("" if r["tokens_agree"] is None else
                                              f" (tokens agree: {r['tokens_agree']})"))
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--new-tokens", type=int, default=None, help="default: 32 on CPU, 64 on CUDA")
    ap.add_argument("--repeat", type=int, default=None, help="timed repeats, fastest kept (default: 9 on CPU, 5 on CUDA)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    cuda = a.device == "cuda"
    torch.manual_seed(0)
    res = bench(a.device, a.new_tokens or (64 if cuda else 32), [1, 8] if cuda else [1, 4],
                a.repeat or (5 if cuda else 9))
    print(json.dumps(res, indent=2) if a.json else table(res))


if __name__ == "__main__":
    main()
