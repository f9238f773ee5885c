"""Records the golden bundles shipped in golden/ from the outside references, on CPU in float32: every capture point
they expose and 8 greedy steps (ignore_eos) with their step logits and KV cache.

    python golden/record_goldens.py                     # from transformers (eager), `transformers` convention
    python golden/record_goldens.py --from keras_hub    # from keras-hub (JAX backend), `keras_hub` convention
    parity golden check golden/tiny-pg2-gqa.bundle --impl jax

transformers bundles run on golden/tiny-inputs.npz and hold every capture point. keras-hub bundles
(NAME.keras_hub.bundle) run on the same inputs made prefix-only (mask_ar = 0: keras-hub's generation treats the
whole prompt as prefix) and hold the points keras-hub exposes (tests/keras_oracle.py, whose weight-name mapping
stays in the test oracle): img/with_posemb, img/blockNN/out, img/encoder_norm, img/projector, llm/input_embeddings,
llm/layerNN/out, llm/final_norm and the logits at every position (PaliGemmaCausalLM's own token_embedding(reverse)
before it keeps the text positions). There is no 28B keras-hub bundle: keras-hub 0.32 ignores the 28B query scale
(tests/test_keras_hub.py::test_keras_hub_ignores_the_28b_query_scale). Re-recording prints what changed.

The checkpoints come from golden/make_checkpoints.py (random values from parity.spec.random_params).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from parity import golden  # noqa: E402

BUNDLES = {  # bundle -> checkpoint: PaliGemma 1 (MQA); PaliGemma 2 (GQA, softcaps, window 8 < the 30-token
    # sequence); PaliGemma 2 with the 28B query scale 1/sqrt(D/N), D/N != H
    "tiny-pg1-mqa.bundle": "tiny-pg1-mqa.npz",
    "tiny-pg2-gqa.bundle": "tiny-pg2-gqa.b16.npz",
    "tiny-pg2-28b.bundle": "tiny-pg2-28b.b16.npz",
}
KERAS_BUNDLES = {
    "tiny-pg1-mqa.keras_hub.bundle": "tiny-pg1-mqa.npz",
    "tiny-pg2-gqa.keras_hub.bundle": "tiny-pg2-gqa.b16.npz",
}
INPUTS = os.path.join(HERE, "tiny-inputs.npz")
STEPS = 8


def record_transformers() -> None:
    for bundle, ckpt in BUNDLES.items():
        out = os.path.join(HERE, bundle)
        rep = golden.record(
            os.path.join(HERE, ckpt),
            INPUTS,
            out,
            impl="transformers",
            convention="transformers",
            steps=STEPS,
            update=os.path.exists(out),
        )
        golden.render_record(rep)


def prefix_only_inputs(path: str) -> None:
    """golden/tiny-inputs.npz with every prompt token in the prefix (mask_ar = 0), written to `path`."""
    with np.load(INPUTS, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["mask_ar"] = np.zeros_like(arrays["mask_ar"])
    np.savez(path, **arrays)


def keras_runner(ckpt: str, inputs: str, steps: int):
    """golden.record's runner: keras-hub's forward points and greedy decoding, in our capture layout."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    import importlib.metadata

    import keras
    from keras_oracle import keras_backbone, keras_decode, keras_forward, keras_generate, keras_logits_all_positions

    from converters.checkpoint import load_checkpoint
    from parity import points as pts
    from parity.conventions import PRESETS
    from parity.inputs import inputs_sha256, load_inputs
    from parity.run import file_sha256, library_versions, write_capture

    assert keras.backend.backend() == "jax", keras.backend.backend()

    def run(scratch: str):
        cfg, params = load_checkpoint(ckpt)
        batch = load_inputs(inputs, cfg)
        bb = keras_backbone(cfg, {k: np.asarray(v, np.float32) for k, v in params.items()})
        t0 = time.perf_counter()
        fwd = keras_forward(cfg, bb, batch)
        full = keras_logits_all_positions(cfg, bb, batch)
        # keras-hub's own logits (PaliGemmaCausalLM) are the text positions of the full-position ones
        np.testing.assert_array_equal(full[:, cfg.num_image_tokens :], fwd[pts.LOGITS])
        fwd[pts.LOGITS] = full
        order = [p for p in pts.forward_points(cfg) if p in fwd]
        manifest = {
            "config": cfg.to_dict(),
            "conventions": PRESETS["keras_hub"].to_dict(),
            "impl": "keras_hub",
            "dtype": "float32",
            "compute_dtype": "float32",
            "device": "cpu (keras-hub, jax backend)",
            "precision": "default",
            "libraries": {**library_versions(), **{n: importlib.metadata.version(n) for n in ("keras", "keras-hub")}},
            "checkpoint": {"path": os.path.abspath(ckpt), "sha256": file_sha256(ckpt)},
            "inputs": {
                "path": os.path.abspath(inputs),
                "sha256": inputs_sha256(batch),
                "file_sha256": file_sha256(inputs),
                "shapes": {k: list(v.shape) for k, v in batch.items()},
            },
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        cap = os.path.join(scratch, "run.capture.safetensors")
        write_capture(
            cap,
            {k: np.ascontiguousarray(fwd[k], np.float32) for k in order},
            {**manifest, "points": order, "run_seconds": round(time.perf_counter() - t0, 3)},
            True,
        )
        t0 = time.perf_counter()
        tokens = keras_generate(bb, batch, steps)
        rows = keras_decode(cfg, bb, batch, tokens)  # teacher-forced with its own picks: its step logits, caches
        t_img, length = cfg.num_image_tokens, batch["text"].shape[1]
        p = t_img + length
        gen = {"tokens": tokens.astype(np.int32), "logits": np.stack([lg for lg, _ in rows]).astype(np.float32)}
        for name in pts.cache_points(cfg):
            shape = rows[0][1][name].shape[1:]
            # our cache layout [B, P + N, K, H]: image + row r's n real tokens at 0..T+n-1, the token fed at step t
            # at P + t. Slots keras-hub has no value for (a short row's padding, the last slot, never fed) stay 0:
            # the checker compares only the real prompt slots and the fed tokens (compare.generation._cache_slots)
            buf = np.zeros((len(rows), p + steps) + shape, np.float32)
            for r, (_, caches) in enumerate(rows):
                n = int(batch["mask_input"][r].sum())
                buf[r, : t_img + n] = caches[name][: t_img + n]
                buf[r, p : p + steps - 1] = caches[name][t_img + n : t_img + n + steps - 1]
            gen[name] = buf
        assert all((np.argmax(lg, -1) == tokens[r]).all() for r, (lg, _) in enumerate(rows))  # its own picks
        path = os.path.join(scratch, "run.generation.safetensors")
        write_capture(
            path,
            gen,
            {
                **manifest,
                "points": list(gen),
                "run_seconds": round(time.perf_counter() - t0, 3),
                "sampling": {"greedy": True, "max_new_tokens": steps, "ignore_eos": True},
                "decode_path": "keras-hub PaliGemmaCausalLM.generate (greedy), step logits and "
                "cache from its _build_cache + call_with_cache fed those tokens",
                "forced_tokens": False,
            },
            True,
        )
        return cap, path, manifest

    return run


def record_keras_hub() -> None:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="parity-keras-inputs-") as d:
        inputs = os.path.join(d, "tiny-inputs-prefix.npz")
        prefix_only_inputs(inputs)
        for bundle, ckpt in KERAS_BUNDLES.items():
            out, path = os.path.join(HERE, bundle), os.path.join(HERE, ckpt)
            rep = golden.record(
                path,
                inputs,
                out,
                impl="keras_hub",
                convention="keras_hub",
                steps=STEPS,
                update=os.path.exists(out),
                runner=keras_runner(path, inputs, STEPS),
            )
            golden.render_record(rep)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--from", dest="source", choices=["transformers", "keras_hub"], default="transformers")
    a = ap.parse_args()
    record_keras_hub() if a.source == "keras_hub" else record_transformers()


if __name__ == "__main__":
    main()
