"""PyTorch PaliGemma 1 / 2: vision.py (SigLIP), projector.py, attention.py, decoder.py (Gemma), model.py,
generate.py (static KV cache), load.py (canonical params), api.py (numpy in, numpy out)."""

from parity.torch_impl.api import build_model, forward, generate
from parity.torch_impl.model import PaliGemma

__all__ = ["PaliGemma", "build_model", "forward", "generate"]
