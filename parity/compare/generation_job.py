"""One side of `parity compare --generate`: greedy decoding of a checkpoint into a generation file (`tokens`
int32[B, N], step `logits` float32[B, N, V], the `llm/layerNN/{k,v}_cache` points at the end), fed side A's tokens
when teacher-forced (`forced_from`). Run in the side's own process by `parity.compare.worker`, or in this one."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from parity import points as pts
from parity.compare.sides import Side, job


def generation_job(
    side: Side,
    inputs: str,
    output: str,
    convention: str,
    config: str | None,
    steps: int,
    ignore_eos: bool = True,
    forced_from: str | None = None,
) -> dict[str, Any]:
    return {
        **job(side, inputs, output, convention, config, None),
        "generate": steps,
        "ignore_eos": ignore_eos,
        "forced_from": forced_from,
    }


def run_generation_job(j: dict[str, Any]) -> dict[str, Any]:
    """Greedy decoding of one side (fed the tokens of `forced_from` when given) into a generation file."""
    from parity import run

    api, model, cfg, batch, manifest = run.prepare(
        j["ckpt"],
        j["inputs"],
        j["impl"],
        j["convention"],
        j["dtype"],
        j["device"],
        j["config"],
        precision=j["precision"],
    )
    kw = {}
    if j.get("forced_from"):
        tensors, _ = run.read_capture(j["forced_from"])
        kw["forced_tokens"] = tensors["tokens"]
    t0 = time.perf_counter()
    g = api.generate(
        model,
        batch,
        j["generate"],
        greedy=True,
        return_logits=True,
        capture=list(pts.cache_points(cfg)),
        ignore_eos=j["ignore_eos"],
        **kw,
    )
    arrays = {
        "tokens": np.ascontiguousarray(g["tokens"], np.int32),
        "logits": np.ascontiguousarray(g["logits"], np.float32),
    }
    arrays.update({k: np.ascontiguousarray(g[k], np.float32) for k in pts.cache_points(cfg) if k in g})
    manifest.update(
        points=list(arrays),
        run_seconds=round(time.perf_counter() - t0, 3),
        sampling={"greedy": True, "max_new_tokens": j["generate"], "ignore_eos": j["ignore_eos"]},
        decode_path=g.get("decode_path"),
        forced_tokens_from=j.get("forced_from"),
    )
    run.write_capture(j["output"], arrays, manifest, True)
    return {"capture": j["output"], "teacher": None}
