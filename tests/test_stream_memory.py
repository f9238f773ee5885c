"""What keeps a block-streamed jax run within one unit's weights (issue 24 §1, docs/memory.md "Where jax's streamed
peak went"): the reader casts into 64-byte-aligned arrays, jax's device arrays alias them instead of copying, and a
unit's arrays are gone when its hook returns, without waiting for Python's cyclic collector."""

import gc
import os
import weakref

import numpy as np
import pytest

from converters import dtypes
from converters.checkpoint import open_checkpoint
from parity import points as pts
from parity import stream
from parity.conventions import Conventions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN_CKPT = os.path.join(ROOT, "golden", "tiny-pg2-gqa.b16.npz")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_aligned_casts_as_astype_does_into_an_aligned_array(dtype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 1000, 7)) * 100).astype(np.float32)[:, 1:]  # not contiguous, not aligned
    out = stream.aligned(x, dtypes.FLOAT_DTYPES[dtype])
    want = x.astype(dtypes.FLOAT_DTYPES[dtype])
    assert out.ctypes.data % stream.ALIGN == 0 and out.flags.c_contiguous
    assert out.dtype == want.dtype and out.shape == want.shape
    assert out.tobytes() == want.tobytes()  # the same rounding, bit for bit
    assert stream.aligned(out, out.dtype) is out  # already aligned: no copy


def test_the_reader_hands_out_aligned_arrays_in_the_compute_dtype():
    with open_checkpoint(GOLDEN_CKPT) as ck:
        src = stream.Source(ck, None, np.dtype(np.float32))
        for w in (src.layer(stream.LLM, 0), src.rows(0, 5), src.take(np.array([1, 2, 7]))):
            for k, x in w.items():
                assert x.dtype == np.float32 and x.ctypes.data % stream.ALIGN == 0, k


@pytest.fixture()
def jax_model():
    ck = open_checkpoint(GOLDEN_CKPT)
    m = stream.load(ck, "jax", Conventions(), "float32", None, "cpu", "highest")
    yield m
    m.close()


def _watch(monkeypatch, h):
    """(weak reference, address) of each host array the hook places (the device arrays are not kept: one would keep
    the host array it aliases alive)."""
    placed = []
    to_device = h.to_device

    def spy(x, dtype, where):
        placed.append((weakref.ref(x.base if x.base is not None else x), x.ctypes.data))
        return to_device(x, dtype, where)

    monkeypatch.setattr(h, "to_device", spy)
    return placed


def test_jax_units_alias_their_weights_and_free_them_when_they_return(jax_model, monkeypatch):
    m, h = jax_model, jax_model.hook
    placed = _watch(monkeypatch, h)
    text = np.array([[2, 5, 9, 5]], np.int32)
    x = np.ones((1, 4, m.config.text.width), np.float32)
    gc.collect()
    gc.disable()  # a unit's arrays must go when it returns, not when the cyclic collector happens to run
    try:
        logits = h.unit(m.model, m.source.rows(0, 7), pts.LOGITS, x, text)
        seq = np.ones((1, m.config.num_image_tokens + 4, m.config.text.width), np.float32)
        block = h.llm_block(m.model, m.source.layer(stream.LLM, 1), 1, seq, {"mask_ar": np.zeros_like(text)})
        vit = h.vit_block(m.model, m.source.layer(stream.VIT, 0), 0, np.ones((1, 4, m.config.vision.width)))
        alive = [host() is not None for host, _ in placed]
    finally:
        gc.enable()
    assert logits.shape == (1, 4, 7) and block and vit
    assert len(placed) > 3 and all(address % stream.ALIGN == 0 for _, address in placed)
    assert not any(alive), f"{sum(alive)} of {len(alive)} placed host arrays outlived their unit"


def test_jax_device_arrays_alias_the_aligned_host_arrays(jax_model, monkeypatch):
    m, h = jax_model, jax_model.hook
    seen = []
    to_device = h.to_device

    def spy(x, dtype, where):
        out = to_device(x, dtype, where)
        seen.append((out.unsafe_buffer_pointer(), x.ctypes.data))
        return out

    monkeypatch.setattr(h, "to_device", spy)
    h.unit(m.model, m.source.rows(0, 7), pts.LOGITS, np.ones((1, 4, m.config.text.width), np.float32), np.zeros((1, 4)))
    assert seen and all(dev == host for dev, host in seen), seen
