"""Training inputs (issue 22): the optional mask_loss, `parity inputs --suffix` and `parity inputs --jsonl`, with the
shipped tokenizer golden/tokenizer.model; every bad line or mask is one line naming the file and where, exit 2."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from parity.cli import main
from parity.config import TINY_VARIANTS
from parity.errors import InputsError
from parity.inputs import inputs_sha256, load_inputs, save_inputs, validate_inputs
from parity.processor import Tokenizer, read_jsonl

GOLDEN = os.path.join(os.path.dirname(__file__), "..", "golden")
TOKENIZER = os.path.join(GOLDEN, "tokenizer.model")
CFG = TINY_VARIANTS["tiny-pg2-gqa"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def png(path, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (20, 16, 3), dtype=np.uint8)).save(path)
    return path


def make(tmp_path, *extra):
    a, b = png(tmp_path / "a.png"), png(tmp_path / "b.png", 1)
    out = tmp_path / "train.npz"
    r = invoke(
        "inputs", a, b, "--prefix", "caption en", "--prefix", "answer en how many?", *extra,
        "--tokenizer", TOKENIZER, "--config", "tiny-pg2-gqa", "-o", out, "--overwrite",
    )  # fmt: skip
    return r, out


def test_suffix_writes_mask_loss_on_suffix_and_eos_only(tmp_path):
    r, out = make(tmp_path, "--suffix", "a cat on a mat", "--suffix", "12")
    assert r.exit_code == 0, r.stderr
    x = load_inputs(out, CFG)
    tok = Tokenizer(TOKENIZER)
    for row, (prefix, suffix) in enumerate([("caption en", "a cat on a mat"), ("answer en how many?", "12")]):
        head = [2, *tok.encode(prefix), *tok.encode("\n")]  # counted by hand from the tokenizer, not the processor
        tail = [*tok.encode(suffix), 1]
        n, pad = len(head) + len(tail), x["text"].shape[1] - len(head) - len(tail)
        assert x["text"][row].tolist() == head + tail + [0] * pad
        assert x["mask_loss"][row].tolist() == [0] * len(head) + [1] * len(tail) + [0] * pad
        assert x["mask_ar"][row].tolist() == [0] * len(head) + [1] * (len(tail) + pad)
        assert x["mask_input"][row].tolist() == [1] * n + [0] * pad
        assert tok.decode(x["text"][row][x["mask_loss"][row] == 1][:-1]) == suffix
    assert x["mask_loss"].dtype == np.int32


def test_no_suffix_means_no_mask_loss_and_old_files_hash_the_same(tmp_path):
    r, out = make(tmp_path)
    assert r.exit_code == 0, r.stderr
    x = load_inputs(out, CFG)
    assert "mask_loss" not in x
    # the shipped inputs (no mask_loss) still load, and adding mask_loss changes the digest
    old = load_inputs(os.path.join(GOLDEN, "tiny-inputs.npz"))
    assert set(old) == {"image", "text", "mask_ar", "mask_input"}
    with_loss = dict(old, mask_loss=np.zeros_like(old["text"]))
    assert inputs_sha256(with_loss) != inputs_sha256(old)


def test_mask_loss_validation(tmp_path):
    r, out = make(tmp_path, "--suffix", "a cat")
    x = load_inputs(out, CFG)
    save_inputs(tmp_path / "rt.safetensors", x)  # round trip through the other format keeps it
    np.testing.assert_array_equal(load_inputs(tmp_path / "rt.safetensors", CFG)["mask_loss"], x["mask_loss"])
    cases = [
        (dict(x, mask_loss=x["mask_loss"] * 2), "mask value not 0/1"),
        (dict(x, mask_loss=x["mask_loss"][:, :-1]), "shape differs from 'text'"),
        (dict(x, mask_loss=np.ones_like(x["mask_loss"])), "loss on a padding token"),
        (dict(x, mask_loss=x["mask_loss"].astype(np.float32)), "wrong dtype"),
    ]
    for bad, what in cases:
        with pytest.raises(InputsError) as e:
            validate_inputs(bad, CFG, "t.npz")
        assert "key 'mask_loss'" in str(e.value) and what in str(e.value), str(e.value)
        assert str(e.value).startswith("t.npz")


def write_jsonl(tmp_path, lines):
    p = tmp_path / "data.jsonl"
    p.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n")
    return p


def test_jsonl_builds_the_same_batch_as_the_flags(tmp_path):
    png(tmp_path / "a.png")
    png(tmp_path / "b.png", 1)
    lines = [
        {"image": "a.png", "prefix": "caption en", "suffix": "a cat on a mat"},
        "",
        {"image": "b.png", "prefix": "answer en how many?", "suffix": "12"},
    ]
    src = write_jsonl(tmp_path, lines)
    r = invoke("inputs", "--jsonl", src, "--tokenizer", TOKENIZER, "--config", "tiny-pg2-gqa", "-o", tmp_path / "j.npz")
    assert r.exit_code == 0, r.stderr
    r2, out = make(tmp_path, "--suffix", "a cat on a mat", "--suffix", "12")
    assert r2.exit_code == 0, r2.stderr
    a, b = load_inputs(tmp_path / "j.npz", CFG), load_inputs(out, CFG)
    assert set(a) == set(b) and "mask_loss" in a
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # --image-dir: names relative to another directory
    (tmp_path / "sub").mkdir()
    moved = write_jsonl(tmp_path / "sub", lines)
    r = invoke(
        "inputs", "--jsonl", moved, "--image-dir", tmp_path, "--tokenizer", TOKENIZER, "--config", "tiny-pg2-gqa",
        "-o", tmp_path / "k.npz",
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert inputs_sha256(load_inputs(tmp_path / "k.npz")) == inputs_sha256(a)


@pytest.mark.parametrize(
    "line, what",
    [
        ("{not json", "not JSON"),
        ('["a.png", "p", "s"]', "expected an object"),
        ({"image": "a.png", "prefix": "caption en"}, "no suffix"),
        ({"image": "missing.png", "prefix": "p", "suffix": "s"}, "image 'missing.png' not found"),
        ({"prefix": "p", "suffix": "s"}, "no 'image'"),
        ({"image": "a.png", "prefix": "p", "suffix": 3}, "'suffix' must be a string"),
    ],
)
def test_bad_jsonl_line_exits_2_naming_the_line(tmp_path, line, what):
    png(tmp_path / "a.png")
    src = write_jsonl(tmp_path, [{"image": "a.png", "prefix": "p", "suffix": "s"}, "", line])
    out = tmp_path / "j.npz"
    r = invoke("inputs", "--jsonl", src, "--tokenizer", TOKENIZER, "--config", "tiny-pg2-gqa", "-o", out)
    assert r.exit_code == 2, r.output
    assert f"{src}: line 3: " in r.stderr and what in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and not out.exists()
    with pytest.raises(InputsError, match="line 3"):
        read_jsonl(src)


def test_jsonl_and_images_are_exclusive(tmp_path):
    a = png(tmp_path / "a.png")
    src = write_jsonl(tmp_path, [{"image": "a.png", "prefix": "p", "suffix": "s"}])
    common = ("--tokenizer", TOKENIZER, "--config", "tiny-pg2-gqa", "-o", tmp_path / "x.npz")
    for args in [(a, "--jsonl", src), ("--prefix", "p", "--jsonl", src), (a, "--image-dir", tmp_path, "--prefix", "p")]:
        r = invoke("inputs", *args, *common)
        assert r.exit_code == 2 and "--" in r.stderr, r.stderr
    r = invoke("inputs", *common)
    assert r.exit_code == 2 and "IMAGES and --prefix" in r.stderr
