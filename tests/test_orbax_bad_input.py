"""Bad orbax input and interrupted orbax output: one line naming the path and the key, exit 2, nothing left."""

import json
import os
import shutil

import numpy as np
import pytest

ocp = pytest.importorskip("orbax.checkpoint")

from converters import orbax_io  # noqa: E402
from converters.convert import convert  # noqa: E402
from parity import spec  # noqa: E402
from parity.config import TINY_VARIANTS  # noqa: E402
from parity.errors import CheckpointError  # noqa: E402
from tests.ckpt_helpers import tiny_npz  # noqa: E402,F401  (fixture)
from tests.test_bad_input import assert_one_line_error, run  # noqa: E402
from tests.test_orbax import nested, orbax_save  # noqa: E402

CFG = TINY_VARIANTS["tiny-pg2-gqa"]


@pytest.fixture
def ours(tiny_npz, tmp_path):
    src, params = tiny_npz("tiny-pg2-gqa")
    convert(src, tmp_path / "ob", "orbax")
    out = tmp_path / "out"
    out.mkdir()
    return tmp_path / "ob", params, out


def to_npz(path, out):
    return run("convert", path, "-o", out / "x.npz", "--to", "npz")


def test_cli_convert_detects_orbax_and_writes_it(tiny_npz, tmp_path):
    src, _ = tiny_npz("tiny-pg1-mqa", "bfloat16")
    code, err, out = run("convert", src, "-o", tmp_path / "ob", "--to", "orbax", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["destination"]["format"] == "orbax" and rep["destination"]["files"] == [str(tmp_path / "ob")]
    code, err, out = run("inspect", tmp_path / "ob", "--json")
    assert code == 0 and json.loads(out)["format"] == "orbax"
    code, err, out = run("convert", tmp_path / "ob", "-o", tmp_path / "st", "--to", "safetensors", "--json")
    assert code == 0 and json.loads(out)["source"]["format"] == "orbax"


def test_missing_ocdbt_manifest(ours):
    path, _, out = ours
    os.remove(path / "manifest.ocdbt")
    code, err, _ = to_npz(path, out)
    assert_one_line_error(code, err, path, "manifest.ocdbt", "truncated")
    assert os.listdir(out) == []


def test_missing_metadata(ours):
    path, _, out = ours
    os.remove(path / "_METADATA")
    code, err, _ = to_npz(path, out)
    assert_one_line_error(code, err, path, "_METADATA", "truncated")


def test_corrupt_metadata_json(ours):
    path, _, out = ours
    (path / "_METADATA").write_text('{"tree_metadata": ')
    code, err, _ = to_npz(path, out)
    assert_one_line_error(code, err, "_METADATA", "unreadable orbax metadata")


def test_data_files_removed_or_truncated(ours):
    path, _, out = ours
    data = sorted((path / "d").iterdir(), key=lambda p: -p.stat().st_size)
    with open(data[0], "r+b") as f:  # the largest data file, cut in half
        f.truncate(data[0].stat().st_size // 2)
    code, err, _ = to_npz(path, out)
    assert_one_line_error(code, err, path, "key '")
    assert os.listdir(out) == []
    for p in data:
        os.remove(p)
    code, err, _ = to_npz(path, out)
    assert_one_line_error(code, err, path, "key '")
    assert os.listdir(out) == []


def test_corrupt_data_bytes(ours):
    path, _, out = ours
    big = max((path / "d").iterdir(), key=lambda p: p.stat().st_size)
    raw = bytearray(big.read_bytes())
    for i in range(len(raw) // 3, len(raw) // 3 + 64):
        raw[i] ^= 0x5A
    big.write_bytes(bytes(raw))
    code, err, _ = to_npz(path, out)
    assert_one_line_error(code, err, path, "key '")
    assert os.listdir(out) == []


def test_array_listed_but_absent(ours):
    path, _, out = ours
    meta = json.loads((path / "_METADATA").read_text())
    meta["tree_metadata"]["('llm', 'ghost')"] = {
        "key_metadata": [{"key": "llm", "key_type": 2}, {"key": "ghost", "key_type": 2}],
        "value_metadata": {"value_type": "np.ndarray"},
    }
    (path / "_METADATA").write_text(json.dumps(meta))
    code, err, _ = to_npz(path, out)
    assert_one_line_error(code, err, path, "llm/ghost", "missing or unreadable")


def test_missing_array(tmp_path):
    params = spec.random_params(CFG)
    del params["llm/layers/mlp/linear"]
    orbax_save(tmp_path / "ck", nested(params))
    code, err, _ = run("convert", tmp_path / "ck", "-o", tmp_path / "x.npz", "--to", "npz", "--config", CFG.name)
    assert_one_line_error(code, err, tmp_path / "ck", "llm/layers/mlp/linear", "missing key")
    assert not os.path.exists(tmp_path / "x.npz")


def test_wrong_shape(tmp_path):
    params = spec.random_params(CFG)
    params["llm/final_norm/scale"] = np.zeros(7, np.float32)
    orbax_save(tmp_path / "ck", nested(params))
    code, err, _ = run("convert", tmp_path / "ck", "-o", tmp_path / "x.npz", "--to", "npz", "--config", CFG.name)
    assert_one_line_error(code, err, tmp_path / "ck", "llm/final_norm/scale", "expected (48,)", "found (7,)")


def test_wrong_dtype(tmp_path):
    params = spec.random_params(CFG)
    params["llm/final_norm/scale"] = np.zeros(48, np.int32)
    orbax_save(tmp_path / "ck", nested(params))
    code, err, _ = run("convert", tmp_path / "ck", "-o", tmp_path / "x.npz", "--to", "npz")
    assert_one_line_error(code, err, tmp_path / "ck", "llm/final_norm/scale", "float32, float16 or bfloat16", "int32")


@pytest.mark.parametrize("tree", ["other_model", "list"])
def test_not_a_paligemma_tree(tmp_path, tree):
    t = (
        {"encoder": {"w": np.zeros((4, 4), np.float32)}}
        if tree == "other_model"
        else {"layers": [np.zeros(3, np.float32), np.zeros(3, np.float32)]}
    )
    orbax_save(tmp_path / "ck", t)
    code, err, _ = run("convert", tmp_path / "ck", "-o", tmp_path / "x.npz", "--to", "npz")
    if tree == "list":
        assert_one_line_error(code, err, tmp_path / "ck", "not a PaliGemma parameter tree")
    else:
        assert_one_line_error(code, err, tmp_path / "ck", "shapes match no known variant")
    code, err, _ = run("convert", tmp_path / "ck", "-o", tmp_path / "x.npz", "--to", "npz", "--config", CFG.name)
    assert code == 2 and "\n" not in err and str(tmp_path / "ck") in err


def test_uncommitted_orbax_tmp_dir(ours, tmp_path):
    path, _, out = ours
    tmp = tmp_path / "ck.orbax-checkpoint-tmp-1234"
    shutil.copytree(path, tmp)
    code, err, _ = to_npz(tmp, out)
    assert_one_line_error(code, err, "never committed")


def test_half_written_directory_without_metadata(ours):
    """What a killed writer leaves under its temporary name (arrays, no metadata) is not taken for a checkpoint."""
    path, _, out = ours
    for name in ("_METADATA", "_CHECKPOINT_METADATA", "commit_success.txt"):
        os.remove(path / name)
    code, err, _ = to_npz(path, out)
    assert_one_line_error(code, err, path, "_METADATA")


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_interrupted_orbax_write_leaves_nothing(tiny_npz, tmp_path, monkeypatch, exc):
    src, _ = tiny_npz()
    calls = []
    orig = orbax_io.OrbaxWriter.write

    def failing(self, *a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise exc("interrupted")
        return orig(self, *a, **k)

    monkeypatch.setattr(orbax_io.OrbaxWriter, "write", failing)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(exc):
        convert(src, out / "ob", "orbax")
    assert os.listdir(out) == []


def test_reader_error_is_checkpoint_error(ours):
    path, _, _ = ours
    os.remove(path / "manifest.ocdbt")
    with pytest.raises(CheckpointError):
        orbax_io.OrbaxReader(path)
