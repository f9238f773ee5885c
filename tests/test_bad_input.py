"""Bad input: a one-line error naming the file, the key, expected and found; exit status 2; nothing left behind."""
import json
import os
import struct

import numpy as np
import pytest
from click.testing import CliRunner

from parity import spec
from parity.cli import main
from parity.config import TINY_VARIANTS
from tests.ckpt_helpers import tiny_npz  # noqa: F401  (fixture)


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stderr.strip(), r.stdout


def assert_one_line_error(code, err, *must_contain):
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    for s in must_contain:
        assert str(s) in err, (s, err)


def assert_nothing_left(d, keep):
    assert sorted(os.listdir(d)) == sorted(keep)


@pytest.fixture
def out(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


def test_truncated_npz(tiny_npz, out):
    src, _ = tiny_npz()
    data = open(src, "rb").read()
    open(src, "wb").write(data[: len(data) // 2])
    code, err, _ = run("convert", src, "-o", out / "x", "--to", "safetensors")
    assert_one_line_error(code, err, src, "truncated or corrupt")
    assert_nothing_left(out, [])


def test_corrupt_zip_member_data_detected_midstream(tiny_npz, out):
    """Flipped bytes in a member's data: the CRC check fails during the conversion; the partial output is removed."""
    src, _ = tiny_npz("tiny-pg2-gqa")
    key = "params/llm/layers/mlp/linear.npy"
    data = bytearray(open(src, "rb").read())
    at = data.index(key.encode()) + 200  # inside that member's data (past its local header and npy header)
    data[at] ^= 0xFF
    open(src, "wb").write(bytes(data))
    code, err, _ = run("convert", src, "-o", out / "x", "--to", "safetensors")
    assert_one_line_error(code, err, src, "llm/layers/mlp/linear", "CRC-32", "expected", "found")
    assert_nothing_left(out, [])


def test_corrupt_zip_directory(tiny_npz, out):
    src, _ = tiny_npz()
    data = bytearray(open(src, "rb").read())
    cd = data.rindex(b"PK\x01\x02")  # a central directory record
    data[cd:cd + 4] = b"XXXX"
    open(src, "wb").write(bytes(data))
    code, err, _ = run("convert", src, "-o", out / "x.npz", "--to", "npz")
    assert_one_line_error(code, err, src)
    assert_nothing_left(out, [])


def test_not_a_checkpoint(tmp_path, out):
    p = tmp_path / "notes.txt"
    p.write_text("hello, I am not a checkpoint\n")
    code, err, _ = run("convert", p, "-o", out / "x", "--to", "safetensors")
    assert_one_line_error(code, err, p, "not a checkpoint")
    code, err, _ = run("inspect", p)
    assert_one_line_error(code, err, p, "not a checkpoint")


def test_npz_of_other_files_is_not_a_checkpoint(tmp_path, out):
    import zipfile
    p = tmp_path / "a.npz"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("readme.txt", "x")
    code, err, _ = run("inspect", p)
    assert_one_line_error(code, err, p, "readme.txt", "not an npz checkpoint")


def _st_file(tmp_path, header: dict, data: bytes = b""):
    h = json.dumps(header).encode()
    d = tmp_path / "lying"
    d.mkdir()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + data)
    return d


def test_safetensors_lying_header_offsets(tmp_path, out):
    d = _st_file(tmp_path, {"a.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}, b"\0" * 16)
    code, err, _ = run("convert", d, "-o", out / "x.npz", "--to", "npz")
    assert_one_line_error(code, err, d / "model.safetensors", "a.weight", "data_offsets [0, 64]", "lying header")
    assert_nothing_left(out, [])


def test_safetensors_lying_header_size_mismatch(tmp_path, out):
    d = _st_file(tmp_path, {"a.weight": {"dtype": "BF16", "shape": [4, 4], "data_offsets": [0, 16]}}, b"\0" * 16)
    code, err, _ = run("inspect", d)
    assert_one_line_error(code, err, "a.weight", "32 bytes for BF16[4, 4]", "data_offsets [0, 16]")


def test_safetensors_lying_header_length(tmp_path, out):
    d = tmp_path / "st"
    d.mkdir()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 10**9) + b'{"a": 1}')
    code, err, _ = run("inspect", d)
    assert_one_line_error(code, err, "model.safetensors", "<header>", "lying header length")


def test_missing_key(tiny_npz, tmp_path, out):
    cfg = TINY_VARIANTS["tiny-pg1-mqa"]
    params = spec.random_params(cfg)
    params.pop("llm/layers/mlp/linear")
    np.savez(tmp_path / "m.npz", **{"params/" + k: v for k, v in params.items()})
    code, err, _ = run("convert", tmp_path / "m.npz", "-o", out / "x", "--to", "safetensors", "--config", cfg.name)
    assert_one_line_error(code, err, "m.npz", "llm/layers/mlp/linear", "expected (2, 96, 64)", "found absent",
                          "missing key")
    assert_nothing_left(out, [])


def test_unexpected_key(tmp_path, out):
    cfg = TINY_VARIANTS["tiny-pg2-gqa"]
    params = spec.random_params(cfg)
    params["llm/layers/attn/extra/w"] = np.zeros((3, 2), np.float32)
    np.savez(tmp_path / "u.npz", **{"params/" + k: v for k, v in params.items()})
    code, err, _ = run("convert", tmp_path / "u.npz", "-o", out / "x", "--to", "safetensors", "--config", cfg.name)
    assert_one_line_error(code, err, "u.npz", "llm/layers/attn/extra/w", "expected absent", "found (3, 2)",
                          "unexpected key")
    assert_nothing_left(out, [])


def test_wrong_shape(tmp_path, out):
    cfg = TINY_VARIANTS["tiny-pg2-gqa"]
    params = spec.random_params(cfg)
    params["llm/layers/mlp/linear"] = params["llm/layers/mlp/linear"][:, :50]
    np.savez(tmp_path / "w.npz", **{"params/" + k: v for k, v in params.items()})
    code, err, _ = run("convert", tmp_path / "w.npz", "-o", out / "x", "--to", "safetensors", "--config", cfg.name)
    assert_one_line_error(code, err, "w.npz", "llm/layers/mlp/linear", "expected (3, 96, 48)", "found (3, 50, 48)")
    assert_nothing_left(out, [])


def test_unsupported_dtype(tmp_path, out):
    cfg = TINY_VARIANTS["tiny-pg1-mqa"]
    params = spec.random_params(cfg)
    params["llm/final_norm/scale"] = params["llm/final_norm/scale"].astype(np.int32)
    np.savez(tmp_path / "d.npz", **{"params/" + k: v for k, v in params.items()})
    code, err, _ = run("convert", tmp_path / "d.npz", "-o", out / "x", "--to", "safetensors")
    assert_one_line_error(code, err, "d.npz", "llm/final_norm/scale", "float32, float16 or bfloat16", "int32")
    assert_nothing_left(out, [])


def test_object_array_is_never_unpickled(tmp_path, out):
    arr = np.empty(2, dtype=object)
    np.savez(tmp_path / "o.npz", **{"params/img/head/bias": arr})
    code, err, _ = run("inspect", tmp_path / "o.npz")
    assert_one_line_error(code, err, "o.npz", "img/head/bias", "object array", "refusing to unpickle")


def test_config_does_not_match_shapes(tmp_path, out):
    """A pos_embedding for a larger image than the config's (the 448-vs-224 mistake, at tiny scale)."""
    cfg = TINY_VARIANTS["tiny-pg1-mqa"]
    params = spec.random_params(cfg)
    params["img/pos_embedding"] = np.zeros((1, 64, 32), np.float32)  # a 56 px grid; the config says 28 px
    np.savez(tmp_path / "c.npz", **{"params/" + k: v for k, v in params.items()})
    code, err, _ = run("convert", tmp_path / "c.npz", "-o", out / "x", "--to", "safetensors", "--config", cfg.name)
    assert_one_line_error(code, err, "c.npz", "img/pos_embedding", "expected (1, 16, 32)", "found (1, 64, 32)",
                          "tiny-pg1-mqa")
    assert_nothing_left(out, [])


def test_undetectable_config_asks_for_one(tmp_path, out):
    cfg = TINY_VARIANTS["tiny-pg1-mqa"]
    params = spec.random_params(cfg)
    params["img/pos_embedding"] = np.zeros((1, 64, 32), np.float32)
    np.savez(tmp_path / "c.npz", **{"params/" + k: v for k, v in params.items()})
    code, err, _ = run("convert", tmp_path / "c.npz", "-o", out / "x", "--to", "safetensors")
    assert_one_line_error(code, err, "c.npz", "--config")


def test_output_exists_without_overwrite(tiny_npz, out):
    src, _ = tiny_npz()
    (out / "x").mkdir()
    (out / "x" / "keep.txt").write_text("mine")
    code, err, _ = run("convert", src, "-o", out / "x", "--to", "safetensors")
    assert_one_line_error(code, err, out / "x", "--overwrite")
    assert os.listdir(out / "x") == ["keep.txt"]
    code, err, _ = run("convert", src, "-o", out / "x", "--to", "safetensors", "--overwrite")
    assert code == 0, err
    assert sorted(os.listdir(out / "x")) == ["config.json", "model.safetensors"]
    assert_nothing_left(out, ["x"])


def test_unwritable_output_directory(tiny_npz, tmp_path):
    src, _ = tiny_npz()
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, err, _ = run("convert", src, "-o", blocker / "x.npz", "--to", "npz")
    assert_one_line_error(code, err, blocker, "not a directory")
    # /proc refuses new files even to root
    code, err, _ = run("convert", src, "-o", "/proc/parity-test-out", "--to", "safetensors")
    assert_one_line_error(code, err, "/proc", "cannot write")
    assert not os.path.exists("/proc/parity-test-out")


def test_invalid_max_shard_size(tiny_npz, out):
    src, _ = tiny_npz()
    code, err, _ = run("convert", src, "-o", out / "x", "--to", "safetensors", "--max-shard-size", "lots")
    assert_one_line_error(code, err, "lots")
    assert_nothing_left(out, [])
