"""Orbax checkpoints: round trips with npz and safetensors (bit-exact, bf16 included), orbax's own output read by
us and ours restored by orbax alone, the config kept in custom metadata, streaming in bounded blocks."""

import json
import os

import ml_dtypes
import numpy as np
import pytest

ocp = pytest.importorskip("orbax.checkpoint")

from safetensors.numpy import load_file as st_load_file  # noqa: E402

from converters import blocks  # noqa: E402
from converters.checkpoint import load_checkpoint, open_checkpoint  # noqa: E402
from converters.convert import convert  # noqa: E402
from converters.inspect import inspect  # noqa: E402
from converters.orbax_io import CUSTOM_KEY, OrbaxReader  # noqa: E402
from parity import spec  # noqa: E402
from parity.config import TINY_VARIANTS, PaliGemmaConfig  # noqa: E402
from tests.ckpt_helpers import DTYPES, tiny_npz  # noqa: E402,F401  (fixture)


def bits(x):
    return np.ascontiguousarray(x).view(np.uint8).tobytes()


def assert_same(a: dict, b: dict):
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (k, a[k].dtype, b[k].dtype)
        assert bits(a[k]) == bits(b[k]), k


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = np.asarray(v)
    return out


def nested(params: dict) -> dict:
    tree: dict = {}
    for k, v in params.items():
        *path, leaf = k.split("/")
        d = tree
        for p in path:
            d = d.setdefault(p, {})
        d[leaf] = v
    return tree


def orbax_save(path, tree, **kw):
    ck = ocp.StandardCheckpointer(**kw)
    ck.save(os.path.abspath(path), tree)
    ck.wait_until_finished()


def orbax_restore(path) -> dict:
    """What a big_vision user gets from orbax alone."""
    return flat(ocp.StandardCheckpointer().restore(os.path.abspath(path)))


def read_npz(path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {
            k[len("params/") :]: (z[k].view(ml_dtypes.bfloat16) if z[k].dtype.kind == "V" else z[k]) for k in z.files
        }


@pytest.mark.parametrize("name", list(TINY_VARIANTS))
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_npz_orbax_npz_bit_exact_and_orbax_restores_it(tiny_npz, tmp_path, name, dtype):
    src, params = tiny_npz(name, dtype)
    r = convert(src, tmp_path / "ob", "orbax")
    assert r["destination"]["format"] == "orbax" and r["tensors"] == len(params) and not r["notes"]
    assert_same(params, orbax_restore(tmp_path / "ob"))  # orbax itself: big_vision's nested params
    convert(tmp_path / "ob", tmp_path / "back.npz", "npz")
    assert_same(params, read_npz(tmp_path / "back.npz"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_safetensors_orbax_safetensors_bit_exact(tiny_npz, tmp_path, dtype):
    src, params = tiny_npz("tiny-pg1-kn", dtype)
    convert(src, tmp_path / "st", "safetensors")
    r = convert(tmp_path / "st", tmp_path / "ob", "orbax")
    assert any(n.startswith("lossy: dropped") for n in r["notes"])
    r = convert(tmp_path / "ob", tmp_path / "st2", "safetensors")
    assert any("padding rows" in n for n in r["notes"])
    a = st_load_file(str(tmp_path / "st" / "model.safetensors"))
    b = st_load_file(str(tmp_path / "st2" / "model.safetensors"))
    assert_same(a, b)
    assert json.load(open(tmp_path / "st" / "config.json")) == json.load(open(tmp_path / "st2" / "config.json"))


def test_orbax_npz_orbax_from_orbax_own_output(tmp_path):
    """A checkpoint orbax wrote (one chunk per array, a top-level `params` key) -> npz -> orbax, bit-exact."""
    cfg = TINY_VARIANTS["tiny-pg2-gqa"]
    params = spec.random_params(cfg, seed=3, dtype=ml_dtypes.bfloat16)
    orbax_save(tmp_path / "theirs", {"params": nested(params)})
    r = convert(tmp_path / "theirs", tmp_path / "x.npz", "npz")
    assert r["source"]["format"] == "orbax" and r["config_source"] == "detected from shapes"
    assert any("top-level `params`" in n for n in r["notes"])
    convert(tmp_path / "x.npz", tmp_path / "ours", "orbax")
    assert_same(params, orbax_restore(tmp_path / "ours"))
    assert_same(params, read_npz(tmp_path / "x.npz"))


@pytest.mark.parametrize("layout", ["ocdbt", "no_ocdbt", "zarr3", "jax_arrays", "pytree_checkpointer"])
def test_reads_what_orbax_writes(tmp_path, layout):
    cfg = TINY_VARIANTS["tiny-pg1-mqa"]
    params = spec.random_params(cfg, seed=1, dtype=np.float16 if layout == "zarr3" else np.float32)
    tree = nested(params)
    path = os.path.abspath(tmp_path / "ck")
    if layout == "jax_arrays":  # what saving nnx.state(model) after to_pure_dict-style flattening gives
        import jax

        orbax_save(path, jax.tree.map(jax.numpy.asarray, tree))
    elif layout == "pytree_checkpointer":
        ocp.PyTreeCheckpointer().save(path, tree)
    else:
        handler = ocp.PyTreeCheckpointHandler(use_ocdbt=layout != "no_ocdbt", use_zarr3=layout == "zarr3")
        ocp.Checkpointer(handler).save(path, args=ocp.args.PyTreeSave(tree))
    got_cfg, got = load_checkpoint(path)
    assert got_cfg.name == cfg.name
    assert_same(params, got)


def test_config_that_shapes_cannot_tell_survives_in_custom_metadata(tiny_npz, tmp_path):
    cfg = TINY_VARIANTS["tiny-pg2-gqa"]
    d = cfg.to_dict()
    d["name"], d["text"]["attn_softcap"], d["text"]["sliding_window"] = "custom", 20.0, 5
    custom = PaliGemmaConfig.from_dict(d)
    src, _ = tiny_npz("tiny-pg2-gqa")
    with open(tmp_path / "c.json", "w") as f:
        f.write(custom.to_json())
    convert(src, tmp_path / "ob", "orbax", config=str(tmp_path / "c.json"))
    meta = ocp.StandardCheckpointer().metadata(os.path.abspath(tmp_path / "ob"))
    assert meta.custom_metadata[CUSTOM_KEY]["config"] == custom.to_dict()  # orbax's own metadata API reads it
    with open_checkpoint(tmp_path / "ob") as ck:
        assert ck.config == custom and ck.config_source == "orbax custom metadata"
    convert(tmp_path / "ob", tmp_path / "back.npz", "npz")
    with open_checkpoint(tmp_path / "back.npz") as ck:
        assert ck.config == custom


def test_inspect_reports_orbax(tiny_npz, tmp_path):
    src, params = tiny_npz("tiny-pg2-28b", "bfloat16")
    convert(src, tmp_path / "ob", "orbax")
    r = inspect(str(tmp_path / "ob"))
    assert r["format"] == "orbax" and r["conforms"] and r["dtypes"] == ["bfloat16"]
    assert r["tensors"] == len(params) and r["parameters"] == r["spec_parameters"]
    assert {row["key"] for row in r["tensors_table"]} == set(params)
    # a tree with one array too many and one missing: both departures, named
    tree = nested({k: v for k, v in params.items() if k != "llm/final_norm/scale"})
    tree["llm"]["extra"] = np.zeros(3, np.float32)
    orbax_save(tmp_path / "odd", tree)
    r = inspect(str(tmp_path / "odd"), "tiny-pg2-28b")
    assert not r["conforms"]
    assert {(d["key"], d["what"]) for d in r["departures"]} == {
        ("llm/final_norm/scale", "missing key"),
        ("llm/extra", "unexpected key"),
    }


# -- streaming in bounded blocks -------------------------------------------------------------------------------
@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 4 KiB and bands of 700 bytes: every tiny MLP kernel is cut into sub-layer row blocks."""
    monkeypatch.setattr(blocks, "BLOCK_BYTES", 4096)
    monkeypatch.setattr(blocks, "BAND_BYTES", 700)
    return 4096


def test_blocks_cover_every_tensor_in_order():
    for shape, itemsize in [((3, 2, 48, 96), 4), ((512, 48), 2), ((48,), 4), ((2, 1, 7, 7, 3, 32), 4)]:
        x = np.arange(int(np.prod(shape))).reshape(shape)
        got = np.concatenate([x[idx][a:b].reshape(-1) for idx, (a, b) in blocks.blocks(shape, itemsize, 1000)])
        assert (got == x.reshape(-1)).all()
        assert all(
            x[idx][a:b].size * itemsize <= max(1000, int(np.prod(shape[len(idx) + 1 :])) * itemsize)
            for idx, (a, b) in blocks.blocks(shape, itemsize, 1000)
        )


def test_transposed_columns_against_numpy():
    m = np.random.default_rng(0).standard_normal((37, 23)).astype(np.float32)
    for a, b in [(0, 23), (5, 11), (22, 23)]:
        got = blocks.transposed_columns(
            lambda r0, r1: m[r0:r1].copy(), 37, 23, cols=(a, b), dtype=m.dtype, band_bytes=200
        )
        assert (got == m[:, a:b].T).all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sub_layer_blocks_round_trip_every_format(tiny_npz, tmp_path, small_blocks, dtype):
    src, params = tiny_npz("tiny-pg2-gqa", dtype)
    cfg = TINY_VARIANTS["tiny-pg2-gqa"]
    with open_checkpoint(src) as ck:  # blocks are bounded: no chunk over the budget for the MLP kernels
        for e in ck.entries():
            if "mlp" in e.key:
                assert max(c.nbytes for c in ck.canonical_chunks(e)) <= small_blocks
                for _, addr in e.hf_keys():
                    assert len(list(ck.hf_chunks(e, addr, None))) > 1
    convert(src, tmp_path / "st", "safetensors")
    want = spec.to_hf(cfg, params)  # the in-memory spec, independent of the streaming code
    assert_same(want, st_load_file(str(tmp_path / "st" / "model.safetensors")))
    convert(tmp_path / "st", tmp_path / "a.npz", "npz")
    convert(tmp_path / "st", tmp_path / "ob", "orbax")
    convert(tmp_path / "ob", tmp_path / "st2", "safetensors")
    convert(tmp_path / "ob", tmp_path / "b.npz", "npz")
    assert_same(params, read_npz(tmp_path / "a.npz"))
    assert_same(params, read_npz(tmp_path / "b.npz"))
    assert_same(params, orbax_restore(tmp_path / "ob"))
    assert_same(want, st_load_file(str(tmp_path / "st2" / "model.safetensors")))
    r = OrbaxReader(tmp_path / "ob")  # our arrays are chunked in the same blocks
    a = r.arrays["llm/layers/mlp/gating_einsum"]
    assert int(np.prod(a.chunks)) * a.dtype.itemsize <= small_blocks


def test_large_orbax_chunks_are_decoded_once_per_chunk(tmp_path, small_blocks, monkeypatch):
    """orbax's default is one chunk per array: reading layer by layer decodes it once, not once per layer."""
    cfg = TINY_VARIANTS["tiny-pg2-gqa"]
    params = spec.random_params(cfg, seed=2)
    orbax_save(tmp_path / "theirs", nested(params))
    reads = []
    orig = OrbaxReader._read_box
    monkeypatch.setattr(OrbaxReader, "_read_box", lambda self, key, box: reads.append(key) or orig(self, key, box))
    _, got = load_checkpoint(tmp_path / "theirs")
    assert_same(params, got)
    assert reads.count("llm/layers/mlp/gating_einsum") == 1


def test_dtype_cast_into_orbax(tiny_npz, tmp_path):
    src, params = tiny_npz("tiny-pg1-mqa", "float32")
    r = convert(src, tmp_path / "ob", "orbax", dtype="bfloat16")
    assert any(n.startswith("lossy: values rounded") for n in r["notes"])
    assert_same({k: v.astype(ml_dtypes.bfloat16) for k, v in params.items()}, orbax_restore(tmp_path / "ob"))


def test_memory_is_bounded_by_blocks_not_layers(tmp_path, monkeypatch):
    """With 32 KiB blocks, converting a model whose MLP pieces are 1 MiB each never holds a piece: numpy's peak
    allocation (tracemalloc) stays a few blocks, in every direction."""
    import dataclasses
    import tracemalloc

    base = TINY_VARIANTS["tiny-pg1-mqa"]
    cfg = dataclasses.replace(base, name="wide-mlp", text=dataclasses.replace(base.text, width=64, mlp_dim=4096))
    params = spec.random_params(cfg, seed=4)
    np.savez(tmp_path / "src.npz", **{"params/" + k: v for k, v in params.items()})
    piece = 64 * 4096 * 4
    monkeypatch.setattr(blocks, "BLOCK_BYTES", 32 << 10)
    monkeypatch.setattr(blocks, "BAND_BYTES", 16 << 10)
    steps = [
        ("src.npz", "st", "safetensors"),
        ("st", "back.npz", "npz"),
        ("st", "ob", "orbax"),
        ("ob", "st2", "safetensors"),
    ]
    for a, b, to in steps:
        tracemalloc.start()
        convert(tmp_path / a, tmp_path / b, to, config=cfg)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < piece / 2, (a, to, peak)
    assert_same(params, read_npz(tmp_path / "back.npz"))
    assert_same(params, orbax_restore(tmp_path / "ob"))
    assert_same(spec.to_hf(cfg, params), st_load_file(str(tmp_path / "st2" / "model.safetensors")))


@pytest.mark.parametrize("budget", [2000, 5000, 9000, 20000, 70000])
def test_every_block_plan_reads_the_same_tensors(tiny_npz, tmp_path, monkeypatch, budget):
    """Whatever the budget (blocks of whole layers, one layer, one piece, rows of a piece), every source reads the
    canonical tensors exactly."""
    src, params = tiny_npz("tiny-pg1-kn", "float32")
    convert(src, tmp_path / "st", "safetensors")
    convert(src, tmp_path / "ob", "orbax")
    monkeypatch.setattr(blocks, "BLOCK_BYTES", budget)
    monkeypatch.setattr(blocks, "BAND_BYTES", budget // 3)
    for path in (src, tmp_path / "st", tmp_path / "ob"):
        with open_checkpoint(path) as ck:
            for e in ck.entries():
                got = np.concatenate([c.reshape(-1) for c in ck.canonical_chunks(e)])
                assert bits(got) == bits(params[e.key]), (path, e.key)
