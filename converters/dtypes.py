"""Dtypes of checkpoint tensors: numpy <-> safetensors names, bfloat16 as a first-class dtype (via ml_dtypes)."""

from __future__ import annotations

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)
FLOAT_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": BF16}
ST_NAMES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", BF16: "BF16"}  # checkpoints hold these
ST_DTYPES = {v: k for k, v in ST_NAMES.items()}
# Every dtype the safetensors format names (inputs files hold integers; float8 via ml_dtypes, refused for weights).
ST_ALL_DTYPES = {
    **ST_DTYPES,
    "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}


def name(dtype: np.dtype) -> str:
    """'float32', 'float16' or 'bfloat16'."""
    for k, v in FLOAT_DTYPES.items():
        if np.dtype(dtype) == v:
            return k
    return str(np.dtype(dtype))


def from_npy_descr(descr: np.dtype, allow_any_numeric: bool = False) -> np.dtype | None:
    """The dtype an npy member holds; numpy stores bfloat16 as void `|V2`. None if unsupported: weights are
    float32/float16/bfloat16; with `allow_any_numeric`, any plain bool/int/float/complex dtype (inputs files)."""
    d = np.dtype(descr)
    if d.kind == "V" and d.itemsize == 2 and d.fields is None and d.subdtype is None:
        return BF16
    if d.fields is not None or d.subdtype is not None or d.hasobject:
        return None
    if allow_any_numeric:
        return d if d.kind in "biufc" else None
    d = d.newbyteorder("=") if d.byteorder == "<" else d
    return d if d in ST_NAMES else None


def to_npy_descr(dtype: np.dtype) -> str:
    """Header descr for an npy member (what np.save writes: '<V2' for bfloat16)."""
    return np.lib.format.dtype_to_descr(np.dtype(dtype))


def cast(x: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
    """Cast to `dtype` (round to nearest even), or keep when None."""
    if dtype is None or x.dtype == dtype:
        return x
    return x.astype(dtype)
