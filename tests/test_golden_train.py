"""Training-step golden bundles (issue 23): the shipped bundles (one step of tiny-pg2-gqa recorded from transformers
under each convention preset: its own, and big_vision's, which transformers' modules run with big_vision's mask,
positions, uncapped logits and per-example loss) checked against both implementations, a planted change caught, and
recording / bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from converters.checkpoint import open_checkpoint
from parity import golden_train
from parity.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "golden")
BUNDLES = {p: os.path.join(GOLDEN, "train", f"tiny-pg2-gqa.{p}.bundle") for p in ("transformers", "big_vision")}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("impl", ["torch", "jax"])
@pytest.mark.parametrize("preset", ["transformers", "big_vision"])
def test_shipped_bundles_pass(preset, impl):
    r = golden_train.check(BUNDLES[preset], impl=impl)
    assert r, r.comparison.verdict().words
    names = [x.point for x in r.comparison.records]
    assert names[:2] == ["train/loss", "train/example_loss"]
    assert "grad/llm/layers/attn/q_einsum/w" in names and golden_train.norm_point("llm/final_norm/scale") in names
    assert r.zero_leaves == {"img/Transformer/encoderblock/MultiHeadDotProductAttention_0/key/bias": 0.0}


def test_bundles_record_what_their_convention_says():
    for preset, path in BUNDLES.items():
        with open(os.path.join(path, "bundle.json")) as f:
            m = json.load(f)
        assert m["convention"] == preset and m["train"]["trainable"] == ["all"]
        assert m["conventions"]["loss_normalization"] == ("per_token" if preset == "transformers" else "per_example")
        assert m["impl"] == "transformers"


def test_a_planted_change_fails_the_check(tmp_path):
    with open_checkpoint(os.path.join(GOLDEN, "tiny-pg2-gqa.b16.npz")) as ck:
        params = {k: np.asarray(v, np.float32) for k, v in ck.load().items()}
    params["llm/layers/attn/q_einsum/w"][1] *= np.float32(1.001)
    np.savez(tmp_path / "planted.npz", **params)
    r = invoke("golden", "check", BUNDLES["big_vision"], "--checkpoint", tmp_path / "planted.npz", "--json")
    assert r.exit_code == 1, r.output
    d = json.loads(r.output)
    assert not d["passed"] and d["comparison"]["first_divergence"] in ("train/loss", "train/example_loss")


def test_record_then_check_and_bad_input(tmp_path):
    out = tmp_path / "t.train.bundle"
    inputs = os.path.join(BUNDLES["big_vision"], "inputs.npz")
    ckpt = os.path.join(GOLDEN, "tiny-pg2-gqa.b16.npz")
    r = invoke("golden", "record", ckpt, "--train-step", "--inputs", inputs, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["schema"] == golden_train.SCHEMA and golden_train.is_train_bundle(str(out))
    assert invoke("golden", "check", out, "--impl", "torch").exit_code == 0
    r = invoke("golden", "record", ckpt, "--train-step", "--inputs", inputs, "-o", out)
    assert r.exit_code == 2 and "exists" in r.output
    forward = tmp_path / "forward.npz"
    np.savez(forward, **{k: v for k, v in np.load(inputs).items() if k != "mask_loss"})
    r = invoke("golden", "record", ckpt, "--train-step", "--inputs", forward, "-o", tmp_path / "x.bundle")
    assert r.exit_code == 2 and "mask_loss" in r.output and not (tmp_path / "x.bundle").exists()
