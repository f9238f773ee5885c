"""Hub references resolve through the real clients against local caches (no network here)."""

import os
import shutil

import numpy as np
import pytest

from converters.checkpoint import load_checkpoint
from converters.convert import convert
from parity.errors import CheckpointError
from tests.ckpt_helpers import tiny_npz  # noqa: F401  (fixture)


def test_hf_reference_from_offline_cache(tiny_npz, tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    src, params = tiny_npz("tiny-pg2-gqa", "bfloat16")
    convert(src, tmp_path / "st", "safetensors")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--google--paligemma2-tiny"
    shutil.copytree(tmp_path / "st", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "cache"))
    cfg, got = load_checkpoint("hf:google/paligemma2-tiny")
    assert cfg.name == "tiny-pg2-gqa"
    for k, v in params.items():
        assert got[k].tobytes() == v.tobytes(), k
    with pytest.raises(CheckpointError, match="hf:google/not-there"):
        load_checkpoint("hf:google/not-there")


def test_kaggle_reference_from_cache(tiny_npz, tmp_path, monkeypatch):
    pytest.importorskip("kagglehub")
    src, params = tiny_npz("tiny-pg1-mqa", "float16")
    base = tmp_path / "kcache" / "models" / "google" / "paligemma" / "jax" / "tiny-224"
    (base / "1").mkdir(parents=True)
    shutil.copy(src, base / "1" / "tiny-224.f16.npz")
    (base / "1.complete").touch()
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kcache"))
    cfg, got = load_checkpoint("kaggle:google/paligemma/jax/tiny-224/1")
    assert cfg.name == "tiny-pg1-mqa"
    for k, v in params.items():
        assert np.array_equal(got[k], v), k


def test_local_paths_starting_like_a_scheme_stay_local(tiny_npz, tmp_path, monkeypatch):
    src, _ = tiny_npz()
    monkeypatch.chdir(tmp_path)
    os.symlink(src, tmp_path / "hf:local.npz")
    cfg, _ = load_checkpoint("hf:local.npz")
    assert cfg.name == "tiny-pg2-gqa"
