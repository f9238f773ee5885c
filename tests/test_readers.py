"""The reader protocol (converters.reader) and config inference from the spec's letter shapes.

Every format's reader implements the protocol and reads what numpy / the safetensors library read from the same
file; inference recovers every variant's shape fields from its shapes, from whichever rows are present."""

import dataclasses
import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file as st_load_file

from converters import reader as rd
from converters.config_source import departures, infer_config, solve_letters
from converters.convert import convert
from converters.npz_io import NpzReader
from converters.safetensors_io import SafetensorsReader
from parity import spec
from parity.config import ALL_VARIANTS, TINY_VARIANTS, PaliGemmaConfig
from parity.errors import CheckpointError
from tests.ckpt_helpers import tiny_npz  # noqa: F401  (fixture)


def _check_reader(r, expected: dict[str, np.ndarray]) -> None:
    """keys/shape/dtype from the header and every read mode against numpy slicing of what another reader read."""
    assert isinstance(r, rd.TensorReader)
    assert sorted(r.keys()) == sorted(expected)
    for k, x in expected.items():
        assert r.shape(k) == x.shape and r.dtype(k) == x.dtype, k
        assert np.array_equal(r.read(k), x), k
        if x.ndim >= 2:
            i = x.shape[0] - 1
            assert np.array_equal(r.read(k, (i,)), x[i]), k
            n = x.shape[1]
            assert np.array_equal(r.read(k, (i,), (1, n)), x[i][1:n]), k
            assert np.array_equal(r.read(k, rows=(0, 1)), x[0:1]), k
        got = []
        rd.scan(r, k, got.append)
        assert np.array_equal(np.concatenate(got), x.reshape(-1)), k
    r.verify_all()


def test_npz_reader_implements_the_protocol(tiny_npz):
    src, _ = tiny_npz("tiny-pg2-gqa", "float32")
    with np.load(src) as z, NpzReader(src) as r:
        _check_reader(r, {k: z[k] for k in z.files})


def test_safetensors_reader_implements_the_protocol(tiny_npz, tmp_path):
    src, _ = tiny_npz("tiny-pg1-kn", "float32")
    convert(src, tmp_path / "st", "safetensors")
    with SafetensorsReader.open(tmp_path / "st") as r:
        _check_reader(r, st_load_file(tmp_path / "st" / "model.safetensors"))
        k = next(k for k in r.keys() if len(r.shape(k)) == 2)
        with pytest.raises(IndexError):
            r.read(k, (r.shape(k)[0],))
        with pytest.raises(IndexError):
            r.read(k, (0,), (0, r.shape(k)[1] + 1))


def test_orbax_reader_implements_the_protocol_and_verify_all_reads_what_was_not_read(tiny_npz, tmp_path):
    pytest.importorskip("tensorstore")
    from converters.orbax_io import CHECKPOINT_METADATA, CUSTOM_KEY, OrbaxReader

    src, params = tiny_npz("tiny-pg2-gqa", "float32")
    convert(src, tmp_path / "ob", "orbax")
    with OrbaxReader(tmp_path / "ob") as r:
        _check_reader(r, params)
    meta = tmp_path / "ob" / CHECKPOINT_METADATA
    d = json.loads(meta.read_text())
    key = "llm/layers/mlp/linear"
    d["custom_metadata"][CUSTOM_KEY]["crc32"][key] ^= 1  # the stored CRC of one array no longer matches its data
    meta.write_text(json.dumps(d))
    with OrbaxReader(tmp_path / "ob") as r:
        r.read(key, (1,))  # out of order: cannot verify on the way
        with pytest.raises(CheckpointError, match="CRC-32") as e:
            r.verify_all()
        assert key in str(e.value)
    from converters.inspect import inspect

    with pytest.raises(CheckpointError, match=key):
        inspect(str(tmp_path / "ob"), verify=True)  # --verify now reads orbax too


def test_npz_verify_all_catches_a_member_never_read(tiny_npz, tmp_path):
    src, _ = tiny_npz("tiny-pg1-mqa", "float32")
    data = bytearray(open(src, "rb").read())
    with NpzReader(src) as r:
        m = r.members["params/llm/final_norm/scale"]
        data[m.offset] ^= 0xFF  # one byte of its data: same size, CRC-32 now wrong
    bad = tmp_path / "bad.npz"
    bad.write_bytes(bytes(data))
    with NpzReader(bad) as r, pytest.raises(CheckpointError, match="llm/final_norm/scale"):
        r.verify_all()


# -- config inference from the spec's letter shapes ------------------------------------------------------------
SHAPE_FIELDS = ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim", "vocab_size", "gemma2")


def _shape_fields(c: PaliGemmaConfig):
    return c.vision, tuple(getattr(c.text, f) for f in SHAPE_FIELDS)


@pytest.mark.parametrize("name", list(ALL_VARIANTS))
def test_infer_config_recovers_every_variant(name):
    cfg = ALL_VARIANTS[name]
    got = infer_config(spec.canonical_shapes(cfg))
    assert _shape_fields(got) == _shape_fields(cfg)  # the variants table is the oracle
    assert not departures(spec.canonical_shapes(cfg), got, "npz")


@pytest.mark.parametrize("name", list(ALL_VARIANTS))
def test_from_symbols_inverts_symbols(name):
    cfg = ALL_VARIANTS[name]
    t = cfg.text
    text = dict(
        gemma2=t.gemma2,
        attn_softcap=t.attn_softcap,
        final_softcap=t.final_softcap,
        sliding_window=t.sliding_window,
        query_scale=t.query_scale,
    )
    assert PaliGemmaConfig.from_symbols(cfg.name, cfg.symbols(), **text) == cfg


def test_letters_come_from_whichever_rows_are_present():
    cfg = TINY_VARIANTS["tiny-pg2-gqa"]
    shapes = spec.canonical_shapes(cfg)
    for k in ("img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel", "llm/layers/mlp/linear"):
        del shapes[k]  # the rows today's hand-written inference read Nv, Hv, F from
    assert solve_letters(shapes) == {k: v for k, v in cfg.symbols().items() if k != "Vhf"}  # Vhf: HF only
    assert _shape_fields(infer_config(shapes)) == _shape_fields(cfg)


def test_one_odd_tensor_is_outvoted_and_reported_as_its_own_departure():
    cfg = TINY_VARIANTS["tiny-pg1-mqa"]
    shapes = spec.canonical_shapes(cfg)
    odd = "llm/layers/attn/q_einsum/w"
    L, N, D, H = shapes[odd]
    shapes[odd] = (L, N, D + 8, H)  # D disagrees with every other row
    got = infer_config(shapes)
    assert _shape_fields(got) == _shape_fields(cfg)
    assert [(k, w) for k, _, _, w in departures(shapes, got, "npz")] == [(odd, "wrong shape")]


def test_a_new_spec_row_needs_no_change_in_inference(monkeypatch):
    cfg = TINY_VARIANTS["tiny-pg2-28b"]
    row = spec._r("llm/layers/new/scale", "L F", "language_model.model.layers.{i}.new.weight")
    monkeypatch.setattr(spec, "TABLE", spec.TABLE + (row,))
    shapes = spec.canonical_shapes(cfg)
    assert shapes["llm/layers/new/scale"] == (cfg.text.depth, cfg.text.mlp_dim)
    for k in ("llm/layers/mlp/gating_einsum", "llm/layers/mlp/linear"):
        del shapes[k]  # F is now told by the new row alone
    assert _shape_fields(infer_config(shapes)) == _shape_fields(cfg)


def _with_h(shapes: dict, h: int) -> dict:
    """Every attention kernel of the decoder with head dim `h` (H is their last or third axis)."""
    out = dict(shapes)
    for k, letters in ((r.key, r.shape) for r in spec.TABLE if r.key in shapes):
        if k.startswith("llm/layers/attn/"):
            out[k] = tuple(h if a == "H" else n for a, n in zip(letters, shapes[k]))
    return out


@pytest.mark.parametrize(
    "change",
    [
        lambda s: {"llm/embedder/input_embedding": s["llm/embedder/input_embedding"]},  # too incomplete
        lambda s: {k: v for k, v in s.items() if not k.startswith("img/")},  # no vision tower at all
        lambda s: _with_h(s, 15),  # an odd head dim: RoPE needs an even one
        lambda s: {**s, "llm/embedder/input_embedding": (0, s["llm/embedder/input_embedding"][1])},  # V = 0
    ],
)
def test_shapes_that_name_no_config_give_none(change):
    assert infer_config(change(spec.canonical_shapes(TINY_VARIANTS["tiny-pg2-gqa"]))) is None


def test_inspect_of_an_unknown_file_infers_its_config(tmp_path):
    base = TINY_VARIANTS["tiny-pg2-gqa"]
    cfg = dataclasses.replace(base, text=dataclasses.replace(base.text, depth=5, mlp_dim=80), name="x")
    p = tmp_path / "unknown.npz"
    np.savez(p, **{spec.NPZ_PREFIX + k: v for k, v in spec.random_params(cfg).items()})
    from converters.inspect import inspect

    r = inspect(str(p))
    assert r["config_source"].startswith("inferred from shapes") and r["conforms"]
    assert r["config_fields"]["text"]["depth"] == 5 and r["config_fields"]["text"]["mlp_dim"] == 80
    assert os.path.exists(p)


def test_zero_dimensional_tied_lm_head_is_a_clean_error(tmp_path):
    from safetensors.numpy import save_file

    from converters.checkpoint import open_checkpoint

    z = np.zeros((), np.float32)
    save_file({"lm_head.weight": z, "language_model.model.embed_tokens.weight": z}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError):  # was an IndexError from the tie check
        open_checkpoint(tmp_path / "model.safetensors", "tiny-pg1-mqa")
