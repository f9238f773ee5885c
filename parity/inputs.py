"""The inputs file: images, tokens and masks, in big_vision's convention, so any reference can produce it.

    image       float32[B, H, W, 3]  NHWC, values in [-1, 1] (H = W = config.vision.image_size)
    text        int32[B, T]          each row starts with <bos> = 2 and is right-padded
    mask_ar     int32[B, T]          0: prefix (full attention among c = 0 tokens); 1: suffix (starts a causal step)
    mask_input  int32[B, T]          optional; 1: token, 0: padding (only at the end of a row); default all ones
    mask_loss   int32[B, T]          optional (training inputs, `parity inputs --suffix`); 1: a token to learn (the
                                     suffix and its <eos>), 0: prefix and padding; never 1 where mask_input is 0

(architecture.md §2.4.) A file is `.npz` (never unpickled; read by converters.npz_io) or `.safetensors`; the format
is detected from the bytes, not the suffix. `validate_inputs` returns the arrays in exactly these dtypes, with
mask_input filled in, or raises `InputsError` with one line naming the file, the key, and what was expected and found.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from converters import dtypes
from converters.atomic import write_file_atomic
from converters.npz_io import NpzReader
from converters.rawio import open_regular
from converters.safetensors_io import SafetensorsReader

from .config import PaliGemmaConfig
from .errors import CheckpointError, InputsError, OutputError, describe

PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
REQUIRED_KEYS = ("image", "text", "mask_ar")
OPTIONAL_KEYS = ("mask_input", "mask_loss")
KEYS = REQUIRED_KEYS + OPTIONAL_KEYS
IMAGE_TOLERANCE = 1e-3  # image values may leave [-1, 1] by this much (resampling filters overshoot slightly)
SUFFIXES = (".npz", ".safetensors")

_INT32 = np.iinfo(np.int32)


# -- reading and writing ------------------------------------------------------------------------------------------
def load_inputs(
    path: str | os.PathLike, config: PaliGemmaConfig | None = None, *, validate: bool = True
) -> dict[str, np.ndarray]:
    """Read an npz or safetensors inputs file; validated against `config` (see `validate_inputs`) unless told not.

    Both formats go through the checkpoint readers (converters.npz_io / safetensors_io): regular files only,
    every structure checked before a byte of data is read (no array larger than the file is ever allocated; with a
    config, the image size is checked from the header first), CRC-32 verified for npz, never unpickled."""
    path = Path(path)
    try:
        fd = open_regular(path, InputsError)
    except InputsError as e:
        raise InputsError(str(e).replace(": cannot open (", ": cannot read the inputs file (", 1)) from None
    try:
        head = os.pread(fd, 9, 0)
    except OSError as e:
        raise InputsError(describe(path, what=f"cannot read the inputs file: {e.strerror or e}")) from None
    finally:
        os.close(fd)
    if head[:2] == b"PK":  # a zip archive: npz
        reader = _open(lambda: NpzReader(path, any_numeric=True))
        shapes = {k: m.shape for k, m in reader.members.items()}
    elif len(head) == 9 and head[8:9] == b"{":  # 8-byte little-endian header length, then JSON
        reader = _open(lambda: SafetensorsReader([os.fspath(path)], allowed=dtypes.ST_ALL_DTYPES))
        shapes = {k: t.shape for k, t in reader.tensors.items()}
    else:
        raise InputsError(
            describe(
                path,
                expected="an npz (zip) or safetensors file",
                found=f"first bytes {head!r}",
                what="unknown inputs format",
            )
        )
    with reader:
        if validate:
            _check_before_reading(shapes, config, path)
        arrays = {k: _open(lambda k=k: reader.read(k)) for k in shapes}
    return validate_inputs(arrays, config, path) if validate else arrays


def _open(fn):
    """Run a reader call; its one-line CheckpointError becomes an InputsError with the same line."""
    try:
        return fn()
    except CheckpointError as e:
        raise InputsError(str(e)) from None


def _check_before_reading(shapes: Mapping[str, tuple[int, ...]], config: PaliGemmaConfig | None, path) -> None:
    """What the header alone can refuse: unknown keys, and an image whose shape differs from the config's."""
    extra = [k for k in shapes if k not in KEYS]
    if extra:
        raise InputsError(
            describe(path, extra[0], f"only keys {', '.join(KEYS)}", f"keys {', '.join(shapes)}", "unexpected key")
        )
    img = shapes.get("image")
    if config is not None and img is not None:
        s = config.vision.image_size
        if len(img) != 4 or tuple(img[1:]) != (s, s, 3):
            raise InputsError(
                describe(
                    path,
                    "image",
                    f"float32[B, {s}, {s}, 3] in [-1, 1]",
                    f"shape [{', '.join(map(str, img))}]",
                    f"image shape differs from config {config.name}",
                )
            )


def save_inputs(path: str | os.PathLike, inputs: Mapping[str, Any], *, overwrite: bool = True) -> Path:
    """Validate `inputs` (no config) and write them in the format named by the suffix (.npz or .safetensors).

    The bytes go to a temporary file in the same directory, renamed over `path` only when complete
    (converters.atomic), so a failed or interrupted write never leaves a partial file under `path` (nor a
    temporary one), and the file gets the permissions open() would give.
    """
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise OutputError(
            describe(
                path,
                expected=" or ".join(SUFFIXES),
                found=repr(path.suffix) or "no suffix",
                what="unknown inputs format",
            )
        )
    if path.exists() and not overwrite:
        raise OutputError(describe(path, what="exists; pass overwrite to replace it"))
    arrays = validate_inputs(inputs, path=path)
    if path.suffix == ".npz":
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        data = buf.getvalue()
    else:
        from safetensors.numpy import save

        data = save(arrays, metadata={"format": "paligemma-parity inputs"})
    write_file_atomic(os.fspath(path), data, overwrite)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def inputs_sha256(inputs: Mapping[str, Any]) -> str:
    """Hex digest of the validated arrays (key, dtype, shape and little-endian C-order bytes, keys sorted).

    Hashing the validated form makes files that mean the same thing agree: int64 vs int32 tokens, or a missing vs
    an all-ones mask_input. The digest does not depend on the file format.
    """
    arrays = validate_inputs(inputs)
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        h.update(f"{key}|{a.dtype.str}|{','.join(map(str, a.shape))}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# -- validation -------------------------------------------------------------------------------------------------
def validate_inputs(
    inputs: Mapping[str, Any], config: PaliGemmaConfig | None = None, path: str | os.PathLike = "<inputs>"
) -> dict[str, np.ndarray]:
    """Check keys, shapes, dtypes and values; return {image: float32, text/mask_ar/mask_input: int32}, plus
    mask_loss (int32) when given: only training needs it, so files without it stay valid for every forward run.

    Integer dtypes (and bool masks) are accepted when the values fit int32; float16/bfloat16 images always, float64
    images when every value is exactly a float32 (anything else would silently change pixels). With a config, the
    image size and the token range [0, vocab_size) are checked too.
    """

    def fail(key, expected, found, what=""):
        raise InputsError(describe(path, key, expected, found, what))

    missing = [k for k in REQUIRED_KEYS if k not in inputs]
    if missing:
        fail(
            missing[0],
            f"keys {', '.join(REQUIRED_KEYS)} (+ optional {', '.join(OPTIONAL_KEYS)})",
            f"keys {', '.join(map(str, inputs)) or 'none'}",
            "missing key",
        )
    extra = [k for k in inputs if k not in KEYS]
    if extra:
        fail(extra[0], f"only keys {', '.join(KEYS)}", f"keys {', '.join(map(str, inputs))}", "unexpected key")

    image = _image(inputs["image"], config, fail)
    text = _int32(inputs["text"], "text", fail, rank_hint="[B, T]")
    b, t = text.shape
    if b == 0 or t == 0:
        fail("text", "int32[B, T] with B >= 1 and T >= 1", _sig(text), "empty batch or empty rows")
    if image.shape[0] != b:
        fail(
            "image",
            f"batch size {b} (from 'text')",
            f"batch size {image.shape[0]} ({_sig(image)})",
            "batch sizes disagree",
        )
    masks = {}
    for key in ("mask_ar", "mask_input", "mask_loss"):
        if key not in inputs:
            continue
        m = _int32(inputs[key], key, fail, rank_hint="[B, T]")
        if m.shape != text.shape:
            what = "batch sizes disagree" if m.shape[0] != b else "shape differs from 'text'"
            fail(key, f"int32[{b}, {t}] (the shape of 'text')", _sig(m), what)
        bad = np.argwhere((m != 0) & (m != 1))
        if bad.size:
            i, j = bad[0]
            fail(key, "values 0 or 1", f"{m[i, j]} at [{i}, {j}]", "mask value not 0/1")
        masks[key] = m
    mask_ar = masks["mask_ar"]
    mask_input = masks.get("mask_input", np.ones_like(text))

    # Padding only at the end of a row, at least one token per row, and <bos> first.
    n_tokens = mask_input.sum(axis=1)
    for i in range(b):
        row, n = mask_input[i], int(n_tokens[i])
        if n == 0:
            fail("mask_input", "at least one token (1) per row", f"row {i} all padding", "a row with no tokens")
        if not row[:n].all():
            j = int(np.argmin(row))  # first padding position, followed by a token
            fail(
                "mask_input",
                "1...1 then 0...0 (right padding)",
                f"row {i}: padding at {j}, token at {j + int(np.argmax(row[j:]))}",
                "padding not only at the end",
            )
        if text[i, 0] != BOS_ID:
            fail("text", f"first token <bos> = {BOS_ID}", f"{text[i, 0]} in row {i}", "row does not start with <bos>")

    bad = np.argwhere(text < 0)
    if bad.size:
        i, j = bad[0]
        fail("text", "token ids >= 0", f"{text[i, j]} at [{i}, {j}]", "negative token id")
    if config is not None:
        v = config.text.vocab_size
        bad = np.argwhere(text >= v)
        if bad.size:
            i, j = bad[0]
            fail(
                "text",
                f"token ids < vocab_size {v} ({config.name})",
                f"{text[i, j]} at [{i}, {j}]",
                "token id out of range",
            )
    out = {"image": image, "text": text, "mask_ar": mask_ar, "mask_input": mask_input}
    if "mask_loss" in masks:
        bad = np.argwhere((masks["mask_loss"] == 1) & (mask_input == 0))
        if bad.size:
            i, j = bad[0]
            fail("mask_loss", "0 on padding (where mask_input is 0)", f"1 at [{i}, {j}]", "loss on a padding token")
        out["mask_loss"] = masks["mask_loss"]
    return out


def _sig(a: np.ndarray) -> str:
    return f"{a.dtype}[{', '.join(map(str, a.shape))}]"


def _array(x: Any, key: str, fail) -> np.ndarray:
    try:
        a = np.asarray(x)
    except Exception as e:  # ragged lists and the like
        fail(key, "an array", type(x).__name__, f"not convertible to an array ({e})")
    if a.dtype == object or (a.dtype.kind in "USV" and a.dtype.name != "bfloat16"):
        fail(key, "a numeric array", f"dtype {a.dtype}", "not numeric")
    return a


def _int32(x: Any, key: str, fail, rank_hint: str) -> np.ndarray:
    a = _array(x, key, fail)
    if a.ndim != 2:
        fail(key, f"int32{rank_hint} (rank 2)", f"{_sig(a)} (rank {a.ndim})", "wrong rank")
    if a.dtype == np.bool_:
        return a.astype(np.int32)
    if a.dtype.kind not in "iu":
        fail(key, f"int32{rank_hint} (or another integer dtype)", _sig(a), "wrong dtype")
    if a.dtype.itemsize >= 4 and a.size and (a.min() < _INT32.min or a.max() > _INT32.max):
        v = a.max() if a.max() > _INT32.max else a.min()
        fail(key, "values that fit int32", f"{v} in {_sig(a)}", "wrong dtype")
    return np.ascontiguousarray(a, dtype=np.int32)


def _image(x: Any, config: PaliGemmaConfig | None, fail) -> np.ndarray:
    a = _array(x, "image", fail)
    size = "S, S" if config is None else f"{config.vision.image_size}, {config.vision.image_size}"
    expected = f"float32[B, {size}, 3] in [-1, 1]"
    if a.ndim != 4:
        fail("image", expected, f"{_sig(a)} (rank {a.ndim})", "wrong rank")
    if a.shape[-1] != 3:
        hint = "channels-first (NCHW)? big_vision images are NHWC" if a.shape[1] == 3 else "wrong shape"
        fail("image", expected, _sig(a), hint)
    if a.size == 0:
        fail("image", expected, _sig(a), "empty image batch")
    if a.dtype.kind in "iub":
        fail(
            "image",
            expected,
            _sig(a),
            "integer pixels; normalise to [-1, 1] first (x/127.5 - 1, parity.processor.load_image)",
        )
    if a.dtype.kind != "f" and a.dtype.name != "bfloat16":
        fail("image", expected, _sig(a), "wrong dtype")
    img = np.ascontiguousarray(a, dtype=np.float32)
    if a.dtype == np.float64 or a.dtype.itemsize > 8:
        with np.errstate(invalid="ignore"):
            inexact = (img.astype(a.dtype) != a) & np.isfinite(a)
        if inexact.any():
            idx = tuple(int(i) for i in np.argwhere(inexact)[0])
            fail(
                "image",
                expected,
                f"{_sig(a)} with {a[idx]!r} at {list(idx)} (not a float32 value)",
                "wrong dtype; cast to float32 explicitly",
            )
    if config is not None and img.shape[1:3] != (config.vision.image_size,) * 2:
        fail("image", expected, _sig(img), f"image size differs from config {config.name}")
    finite = np.isfinite(img)
    if not finite.all():
        idx = [int(i) for i in np.argwhere(~finite)[0]]
        fail(
            "image",
            expected,
            f"{img[tuple(idx)]} at {idx} ({int((~finite).sum())} non-finite values)",
            "non-finite pixel",
        )
    lo, hi = float(img.min()), float(img.max())
    if lo < -1 - IMAGE_TOLERANCE or hi > 1 + IMAGE_TOLERANCE:
        hint = "; pixels in [0, 255]? use x/127.5 - 1" if hi > 2 and lo >= 0 else ""
        fail(
            "image",
            f"values in [-1, 1] (± {IMAGE_TOLERANCE:g})",
            f"min {lo:.6g}, max {hi:.6g}",
            f"pixel values out of range{hint}",
        )
    return img
