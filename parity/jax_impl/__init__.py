"""JAX / Flax NNX PaliGemma 1 / 2, file for file beside parity/torch_impl: vision.py (SigLIP), projector.py,
attention.py, decoder.py (Gemma), model.py, generate.py (preallocated KV cache, compiled decode loop), load.py
(canonical params, stacked layers as stored), mesh.py (sharding), api.py (numpy in, numpy out). Never imports torch."""

from parity.jax_impl.api import build_model, forward, generate
from parity.jax_impl.model import PaliGemma

__all__ = ["PaliGemma", "build_model", "forward", "generate"]
