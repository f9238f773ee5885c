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
