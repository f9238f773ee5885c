"""A fine-tuning step beside transformers' `loss.backward()` (issue 22): time and peak RSS on a reduced PaliGemma 2
shape on CPU, float32, the guide's attention-only mask (or --trainable all).

    python benchmarks/train_step.py [--vision-depth 2 --text-depth 2 --vocab 16384 --repeat 3] [--trainable all]

Sides, on the same weights and batch (benchmarks/pg2_shapes.py: PaliGemma 2 3B-224 widths, heads and image size;
depth cut, and the vocabulary cut with --vocab so that a model, its transformers copy and their gradients fit a
small machine; --vocab 257152 is the released one):
  transformers: `PaliGemmaForConditionalGeneration(labels=...)` forward + `loss.backward()` alone (its own
    per-token loss), and parity.hf_side.train_step (the same plus the canonical gradients and the SGD update);
  torch / jax: parity.{torch,jax}_impl.api.train_step under both normalisations (big_vision's per_example, and
    per_token), when the implementation has a train_step (issue 22's CORE branch); reported as not available else.
Each figure is the median of --repeat runs after one warm-up; ratios are against transformers' loss.backward().
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pg2_shapes import batch, random_weights, reduced_pg2_3b

from parity import hf_side
from parity.config import PaliGemmaConfig
from parity.conventions import PRESETS
from parity.training import TrainOptions


def config(vision_depth: int, text_depth: int, vocab: int) -> PaliGemmaConfig:
    cfg = reduced_pg2_3b(vision_depth, text_depth)
    return dataclasses.replace(cfg, name=f"{cfg.name}-V{vocab}", text=dataclasses.replace(cfg.text, vocab_size=vocab))


def training_batch(cfg: PaliGemmaConfig) -> dict[str, np.ndarray]:
    x = batch(cfg)
    x["mask_loss"] = (x["mask_ar"] * x["mask_input"]).astype(np.int32)  # the suffix of each row
    x["text"][x["mask_loss"] == 1] %= 256  # keep targets among ordinary ids
    x["text"][:, 0] = 2
    return x


def timed(fn, repeat: int) -> float:
    fn()  # warm-up (jax compiles here)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vision-depth", type=int, default=2)
    ap.add_argument("--text-depth", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--trainable", default="llm/layers/attn/*")
    ap.add_argument("--impls", default="torch,jax")
    args = ap.parse_args()

    import torch

    cfg = config(args.vision_depth, args.text_depth, args.vocab)
    params = random_weights(cfg)
    x = training_batch(cfg)
    options = TrainOptions(trainable=(args.trainable,), lr=0.0)  # lr 0: every run sees the same weights
    print(
        f"{cfg.name}, batch {x['text'].shape}, trainable {args.trainable}, {platform.processor() or 'cpu'}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    rows = []

    hf = hf_side.build_model(cfg, PRESETS["transformers"], params=params)
    hb = hf_side.hf_batch(cfg, x)
    from parity import spec
    from parity.hf_train import _leaf_params, labels_for
    from parity.training import trainable_leaves

    labels = torch.as_tensor(labels_for(cfg, x))
    leaves = trainable_leaves(options, [e.key for e in spec.entries(cfg)])
    trained = {id(p) for pieces in _leaf_params(hf.module, cfg, leaves).values() for p, _, _ in pieces}
    hf.module.train()
    for p in hf.module.parameters():
        p.requires_grad_(id(p) in trained)

    def hf_backward(m=hf.module):
        m.zero_grad(set_to_none=True)
        m(**hb, labels=labels).loss.backward()

    base = timed(hf_backward, args.repeat)
    rows.append(("transformers loss.backward()", base))
    hf.module.eval()
    rows.append(("transformers hf_side.train_step", timed(lambda m=hf: hf_side.train_step(m, x, options), args.repeat)))
    hf = hb = None
    print(f"  peak RSS after transformers: {peak_rss_gb():.2f} GB")

    for impl in [i for i in args.impls.split(",") if i]:
        api = importlib.import_module(f"parity.{impl}_impl.api")
        if not hasattr(api, "train_step"):
            rows.append((f"{impl} train_step", None))
            continue
        from parity.conventions import with_settings

        for norm in ("per_example", "per_token"):
            try:
                conv = with_settings(PRESETS["big_vision"], [f"loss_normalization={norm}"])
            except ValueError:
                conv = PRESETS["big_vision"]
            model = api.build_model(cfg, conv, params=params)
            step = timed(lambda m=model, a=api: a.train_step(m, x, options), args.repeat)
            rows.append((f"{impl} train_step ({norm})", step))
            model = None
        print(f"  peak RSS after {impl}: {peak_rss_gb():.2f} GB")

    width = max(len(r[0]) for r in rows)
    for name, t in rows:
        shown = "not available (no train_step)" if t is None else f"{t * 1e3:9.1f} ms  {t / base:5.2f}x"
        print(f"  {name:<{width}}  {shown}")


if __name__ == "__main__":
    main()
