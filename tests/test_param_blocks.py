"""Loading block by block (issue 24 §2): torch and jax fill their tensors from a checkpoint's stream of blocks
(parity.param_blocks) with no numpy copy of the model. The loaded parameters are checked against numpy's own reading
of the file (np.load: not our readers), with blocks small enough that every kind occurs (whole layers, one layer,
rows of one, pieces of an HF tensor), for npz, safetensors (the HF layout) and bf16 cast on the way."""

from __future__ import annotations

import numpy as np
import pytest
from ckpt_helpers import write_npz

from converters import blocks as blocks_mod
from converters.checkpoint import open_checkpoint
from converters.convert import convert
from parity import param_blocks, spec
from parity.config import TINY_VARIANTS
from parity.conventions import PRESETS
from parity.errors import CheckpointError

CFG = TINY_VARIANTS["tiny-pg2-gqa"]


def _build(impl, params, dtype="float32"):
    if impl == "torch":
        from parity.torch_impl import api
        from parity.torch_impl.load import state_to_canonical

        return state_to_canonical(api.build_model(CFG, PRESETS["big_vision"], dtype=dtype, params=params))
    from parity.jax_impl import api
    from parity.jax_impl.load import state_to_canonical

    return state_to_canonical(api.build_model(CFG, PRESETS["big_vision"], dtype=dtype, params=params).module)


def _numpy_reading(path) -> dict[str, np.ndarray]:
    """bf16 members come back from np.load as void |V2: viewed as ml_dtypes.bfloat16, then widened."""
    import ml_dtypes

    out = {}
    with np.load(path) as z:
        for k in z.files:
            v = z[k]
            v = v.view(ml_dtypes.bfloat16) if v.dtype.kind == "V" else v
            out[k[len(spec.NPZ_PREFIX) :]] = v.astype(np.float32)
    return out


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of at most 2 KiB: stacked tensors arrive as single layers, rows of a layer and rows of a table."""
    monkeypatch.setattr(blocks_mod, "BLOCK_BYTES", 2048)
    monkeypatch.setattr(blocks_mod, "BAND_BYTES", 512)


@pytest.mark.parametrize("impl", ["torch", "jax"])
@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_blocks_load_what_numpy_reads(tmp_path, impl, fmt, small_blocks):
    import ml_dtypes

    src = tmp_path / "m.npz"
    write_npz(src, CFG, ml_dtypes.bfloat16, seed=4)
    expected = _numpy_reading(src)
    path = src if fmt == "npz" else tmp_path / "m.st"
    if fmt != "npz":
        convert(str(src), str(path), "safetensors")
    with open_checkpoint(path) as ck:
        shapes = {e.key: tuple(e.shape) for e in ck.entries()}
        kinds = {(len(i), param_blocks.is_whole(shapes[k], i, r)) for k, i, r, _ in ck.blocks()}
        assert {(0, True), (0, False), (1, False)} <= kinds, kinds  # whole, whole layers / rows, rows of a layer
        params = ck.load(stream=True)
        assert isinstance(params, param_blocks.ParamBlocks)
        got = _build(impl, params)
    assert set(got) == set(expected)
    for k, v in expected.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


@pytest.mark.parametrize("impl", ["torch", "jax"])
def test_dict_and_blocks_load_the_same_model(tmp_path, impl, small_blocks):
    path = tmp_path / "m.npz"
    params = write_npz(path, CFG, np.float32, seed=5)
    with open_checkpoint(path) as ck:
        streamed = _build(impl, ck.load(stream=True))
    whole = _build(impl, params)
    for k in params:
        np.testing.assert_array_equal(streamed[k], whole[k], err_msg=k)
        np.testing.assert_array_equal(whole[k], params[k], err_msg=k)


@pytest.mark.parametrize("impl", ["torch", "jax"])
def test_a_stream_missing_a_block_is_caught(tmp_path, impl, small_blocks):
    """A reader that skips part of a tensor would leave zeros in the model: the loaders count every element."""
    path = tmp_path / "m.npz"
    write_npz(path, CFG, np.float32, seed=6)
    with open_checkpoint(path) as ck:
        p = ck.load(stream=True)
        skipped = (b for i, b in enumerate(p.blocks) if i != 3)
        with pytest.raises(AssertionError, match="incompletely"):
            _build(impl, param_blocks.ParamBlocks(p.shapes, skipped, p.source))


@pytest.mark.parametrize("impl", ["torch", "jax"])
def test_shapes_are_checked_before_any_block_is_read(impl):
    """A wrong shape is refused (CheckpointError naming the key) before the stream is touched."""
    shapes = spec.canonical_shapes(CFG)
    key = "llm/final_norm/scale"
    shapes[key] = (shapes[key][0] + 1,)

    def never():
        raise AssertionError("a block was read before the shapes were checked")
        yield

    with pytest.raises(CheckpointError, match=key):
        _build(impl, param_blocks.ParamBlocks(shapes, never(), "bad.npz"))
