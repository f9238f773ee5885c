"""Tiny checkpoints generated from the spec (never hand-written), for the converter tests."""

import os

import ml_dtypes
import numpy as np
import pytest

from parity import spec
from parity.config import TINY_VARIANTS

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def write_npz(path, cfg, dtype=np.float32, seed=0, prefix=True):
    params = spec.random_params(cfg, seed=seed, dtype=dtype)
    np.savez(path, **{(spec.NPZ_PREFIX if prefix else "") + k: v for k, v in params.items()})
    return params


@pytest.fixture
def tiny_npz(tmp_path):
    """Factory: (config name, dtype, prefix) -> (path, params)."""

    def make(name="tiny-pg2-gqa", dtype="float32", prefix=True, seed=0):
        cfg = TINY_VARIANTS[name]
        path = os.path.join(tmp_path, f"{name}.{dtype}.npz")
        return path, write_npz(path, cfg, DTYPES[dtype], seed, prefix)

    return make


def every_format(d, golden_ckpt: str) -> dict[str, str]:
    """tiny-pg2-gqa in every format a streamed run reads, under directory `d`: float32 npz (no prefix, seed 3), the
    shipped bf16 npz `golden_ckpt` (|V2, with the params/ prefix), safetensors (of the float32 npz), orbax (of the
    bf16 one)."""
    from converters.convert import convert

    f32 = os.path.join(d, "tiny.f32.npz")
    write_npz(f32, TINY_VARIANTS["tiny-pg2-gqa"], np.float32, seed=3, prefix=False)
    st, ob = os.path.join(d, "tiny.safetensors"), os.path.join(d, "tiny.orbax")
    convert(f32, st, "safetensors")
    convert(golden_ckpt, ob, "orbax")
    return {"npz": f32, "bf16 npz": golden_ckpt, "safetensors": st, "orbax": ob}
