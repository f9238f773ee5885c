"""Round trips of every format pair, checked bit-exact, and the readers against outside code (numpy, safetensors)."""

import json
import os

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file as st_load_file
from safetensors.numpy import save_file as st_save_file

from converters.checkpoint import load_checkpoint, open_checkpoint, sidecar_path
from converters.convert import convert
from converters.inspect import inspect
from converters.npz_io import NpzReader
from converters.safetensors_io import SafetensorsReader
from parity import spec
from parity.config import TINY_VARIANTS, PaliGemmaConfig, TextConfig
from tests.ckpt_helpers import tiny_npz  # noqa: F401  (fixture)


def bits(x):
    return np.ascontiguousarray(x).view(np.uint8).tobytes()


def assert_same_params(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert bits(a[k]) == bits(b[k]), k


@pytest.mark.parametrize("name", list(TINY_VARIANTS))
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_npz_safetensors_npz_bit_exact(tiny_npz, tmp_path, name, dtype):
    src, params = tiny_npz(name, dtype)
    r1 = convert(src, tmp_path / "st", "safetensors")
    assert r1["config"] == name and r1["config_source"] == "detected from shapes"
    assert any("padding rows" in n for n in r1["notes"])
    r2 = convert(tmp_path / "st", tmp_path / "back.npz", "npz")
    assert any(n.startswith("lossy: dropped") for n in r2["notes"])
    # numpy itself reads our npz (bf16 as |V2, like the released files)
    with np.load(tmp_path / "back.npz", allow_pickle=False) as z:
        got = {
            k[len("params/") :]: (z[k].view(ml_dtypes.bfloat16) if z[k].dtype.kind == "V" else z[k]) for k in z.files
        }
    assert_same_params(params, got)


def test_safetensors_written_by_us_load_in_safetensors_library(tiny_npz, tmp_path):
    src, params = tiny_npz("tiny-pg2-gqa", "float32")
    convert(src, tmp_path / "st", "safetensors")
    ours = st_load_file(str(tmp_path / "st" / "model.safetensors"))
    cfg = TINY_VARIANTS["tiny-pg2-gqa"]
    want = spec.to_hf(cfg, params)
    assert set(ours) == set(want)
    for k in want:
        assert bits(ours[k]) == bits(want[k]), k
    emb = ours["language_model.model.embed_tokens.weight"]
    assert emb.shape[0] == cfg.hf_vocab_rows
    mean = params["llm/embedder/input_embedding"].astype(np.float64).mean(0).astype(np.float32)
    assert (emb[cfg.text.vocab_size :] == mean).all()


def test_reads_safetensors_written_by_the_library(tmp_path):
    cfg = TINY_VARIANTS["tiny-pg1-mqa"]
    params = spec.random_params(cfg, seed=5)
    hf = spec.to_hf(cfg, params)
    os.makedirs(tmp_path / "lib")
    st_save_file(hf, str(tmp_path / "lib" / "model.safetensors"), metadata={"format": "pt"})
    got_cfg, got = load_checkpoint(tmp_path / "lib")
    assert got_cfg.name == "tiny-pg1-mqa"
    assert_same_params(params, got)


def test_sharded_safetensors_and_back(tiny_npz, tmp_path):
    src, params = tiny_npz("tiny-pg2-28b", "bfloat16")
    r = convert(src, tmp_path / "st", "safetensors", max_shard_size="30KB")
    files = os.listdir(tmp_path / "st")
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files
    index = json.load(open(tmp_path / "st" / "model.safetensors.index.json"))
    assert set(index["weight_map"]) == set(spec.hf_shapes(TINY_VARIANTS["tiny-pg2-28b"]))
    assert index["metadata"]["total_size"] == r["bytes"]
    for shard in shards:  # every shard alone is a valid safetensors file
        st_load_file(str(tmp_path / "st" / shard))
    _, back = load_checkpoint(tmp_path / "st" / "model.safetensors.index.json")
    assert_same_params(params, back)


def test_safetensors_to_safetensors_keeps_padding_rows(tmp_path):
    """st -> st (re-shard, re-type) keeps the file's own padding rows instead of recomputing them."""
    cfg = TINY_VARIANTS["tiny-pg1-kn"]
    hf = spec.to_hf(cfg, spec.random_params(cfg, seed=2))
    key = "language_model.model.embed_tokens.weight"
    hf[key][cfg.text.vocab_size :] = np.random.default_rng(9).standard_normal(hf[key][cfg.text.vocab_size :].shape)
    os.makedirs(tmp_path / "a")
    st_save_file(hf, str(tmp_path / "a" / "model.safetensors"))
    convert(tmp_path / "a", tmp_path / "b", "safetensors", max_shard_size="10KB")
    convert(tmp_path / "b", tmp_path / "c", "safetensors")
    out = st_load_file(str(tmp_path / "c" / "model.safetensors"))
    for k in hf:
        assert bits(out[k]) == bits(hf[k]), k


def test_unprefixed_notebook_npz_is_read_and_released_form_written(tiny_npz, tmp_path):
    src, params = tiny_npz("tiny-pg1-mqa", "float16", prefix=False)
    with open_checkpoint(src) as ck:
        assert any("params/" in n for n in ck.notes)
    convert(src, tmp_path / "out.npz", "npz")
    assert all(k.startswith("params/") for k in NpzReader(tmp_path / "out.npz").keys())
    _, back = load_checkpoint(tmp_path / "out.npz")
    assert_same_params(params, back)


def test_dtype_option_rounds_and_reports(tiny_npz, tmp_path):
    src, params = tiny_npz("tiny-pg2-gqa", "float32")
    r = convert(src, tmp_path / "b.npz", "npz", dtype="bfloat16")
    assert any("lossy: values rounded" in n for n in r["notes"])
    _, back = load_checkpoint(tmp_path / "b.npz")
    for k, v in params.items():
        assert back[k].dtype == ml_dtypes.bfloat16
        assert bits(back[k]) == bits(v.astype(ml_dtypes.bfloat16)), k
    r = convert(tmp_path / "b.npz", tmp_path / "c.npz", "npz", dtype="float32")
    assert not any("lossy" in n for n in r["notes"])  # widening is exact


def test_sidecar_keeps_what_shapes_cannot_tell(tmp_path):
    """A custom Gemma 2 config (no softcaps, window 5) survives npz -> st -> npz -> st via sidecar/config.json."""
    base = TINY_VARIANTS["tiny-pg2-gqa"]
    custom = PaliGemmaConfig(
        "custom",
        base.vision,
        TextConfig(
            **{
                **{f: getattr(base.text, f) for f in base.text.__dataclass_fields__},
                "attn_softcap": None,
                "final_softcap": 10.0,
                "sliding_window": 5,
            }
        ),
    )
    params = spec.random_params(custom, seed=4)
    np.savez(tmp_path / "a.npz", **{"params/" + k: v for k, v in params.items()})
    cfgfile = tmp_path / "custom.json"
    cfgfile.write_text(custom.to_json())
    convert(tmp_path / "a.npz", tmp_path / "st", "safetensors", config=str(cfgfile))
    hfc = json.load(open(tmp_path / "st" / "config.json"))
    assert hfc["text_config"]["final_logit_softcapping"] == 10.0 and hfc["text_config"]["sliding_window"] == 5
    convert(tmp_path / "st", tmp_path / "b.npz", "npz")
    assert os.path.exists(sidecar_path(tmp_path / "b.npz"))
    convert(tmp_path / "b.npz", tmp_path / "st2", "safetensors")
    with open_checkpoint(tmp_path / "st2") as ck:
        assert ck.config.text == custom.text
    assert inspect(str(tmp_path / "b.npz"))["config_source"].startswith("sidecar")


def test_in_memory_transformers_names_are_read(tmp_path):
    """Checkpoints saved with transformers' in-memory names (model.language_model..., lm_head.weight)."""
    cfg = TINY_VARIANTS["tiny-pg2-gqa"]
    params = spec.random_params(cfg, seed=8)
    hf = spec.to_hf(cfg, params)
    renamed = {}
    for k, v in hf.items():
        k = k.replace("language_model.model.", "model.language_model.")
        k = k.replace("vision_tower.vision_model.", "model.vision_tower.")  # 5.6+: no vision_model level
        k = k.replace("multi_modal_projector.", "model.multi_modal_projector.")
        renamed[k] = v
    renamed["lm_head.weight"] = renamed["model.language_model.embed_tokens.weight"].copy()
    os.makedirs(tmp_path / "mem")
    st_save_file(renamed, str(tmp_path / "mem" / "model.safetensors"))
    c, back = load_checkpoint(tmp_path / "mem")
    assert c.name == cfg.name
    assert_same_params(params, back)


def test_inspect_reports_departures(tiny_npz, tmp_path):
    src, params = tiny_npz("tiny-pg1-mqa")
    rep = inspect(src)
    assert rep["conforms"] and rep["parameters"] == rep["spec_parameters"] == spec.param_count(
        TINY_VARIANTS["tiny-pg1-mqa"]
    )
    params = dict(params)
    params.pop("llm/final_norm/scale")
    params["extra/thing"] = np.zeros(3, np.float32)
    np.savez(tmp_path / "bad.npz", **{"params/" + k: v for k, v in params.items()})
    rep = inspect(str(tmp_path / "bad.npz"), config="tiny-pg1-mqa")
    whats = {(d["key"], d["what"]) for d in rep["departures"]}
    assert ("llm/final_norm/scale", "missing key") in whats and ("extra/thing", "unexpected key") in whats
    assert not rep["conforms"]


def test_safetensors_reader_rows_and_index_validation(tiny_npz, tmp_path):
    src, params = tiny_npz("tiny-pg1-mqa")
    convert(src, tmp_path / "st", "safetensors")
    r = SafetensorsReader.open(tmp_path / "st")
    emb = r.read("language_model.model.embed_tokens.weight", rows=(3, 7))
    np.testing.assert_array_equal(emb, params["llm/embedder/input_embedding"][3:7])


@pytest.mark.parametrize("zip64_end", [False, True])
def test_our_npz_writer_gives_what_np_savez_gives_to_numpy_and_zipfile(tmp_path, monkeypatch, zip64_end):
    """The archive NpzWriter writes itself (ISA-L CRC-32, zip64 sizes patched into each local header) holds the
    same members, sizes and CRC-32s as np.savez's, passes zipfile's own CRC check and reads back bit for bit with
    np.load and our reader; with zip64_end the zip64 end records are written too (as for more than 65535 members
    or a directory past 4 GiB), shown here by lowering the member-count limit."""
    import zipfile

    from converters import npz_write

    if zip64_end:
        monkeypatch.setattr(npz_write, "_MAX16", 2)
    rng = np.random.default_rng(0)
    arrays = {
        "params/a": rng.standard_normal((3, 5)).astype(np.float32),
        "params/b": rng.standard_normal((4, 2, 3)).astype(ml_dtypes.bfloat16),
        "params/c": rng.standard_normal(7).astype(np.float16),
        "params/empty": np.zeros((0, 4), np.float32),
    }
    ours, theirs = tmp_path / "ours.npz", tmp_path / "theirs.npz"
    with open(ours, "wb") as f, npz_write.NpzWriter(f) as w:
        for k, a in arrays.items():
            w.write(k, a.dtype, a.shape, [a[:1], a[1:]])  # in two chunks
    np.savez(theirs, **arrays)
    with zipfile.ZipFile(ours) as zo, zipfile.ZipFile(theirs) as zt:
        assert zo.testzip() is None
        assert [(i.filename, i.file_size, i.CRC) for i in zo.infolist()] == [
            (i.filename, i.file_size, i.CRC) for i in zt.infolist()
        ]
        assert all(zo.read(n) == zt.read(n) for n in zt.namelist())
        # no clock in the archive: converting the same input again gives the same bytes (np.savez stamps the time)
        assert all(i.date_time == (1980, 1, 1, 0, 0, 0) for i in zo.infolist())
    with np.load(ours, allow_pickle=False) as z:
        assert sorted(z.files) == sorted(arrays) and all(bits(z[k]) == bits(arrays[k]) for k in arrays)
    r = NpzReader(str(ours))
    assert all(bits(r.read(k)) == bits(arrays[k]) for k in arrays)
    raw = ours.read_bytes()
    assert (b"PK\x06\x06" in raw) == zip64_end
