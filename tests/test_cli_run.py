"""`parity capture` / `parity generate` end to end on the shipped golden files, and their bad-input errors."""

import json
import os

import numpy as np
from click.testing import CliRunner

from parity import points as pts
from parity.cli import main
from parity.config import TINY_VARIANTS
from parity.inputs import load_inputs, save_inputs
from parity.run import file_sha256, read_capture

GOLDEN = os.path.join(os.path.dirname(__file__), "..", "golden")
CKPT = os.path.join(GOLDEN, "tiny-pg2-gqa.b16.npz")
INPUTS = os.path.join(GOLDEN, "tiny-inputs.npz")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_capture_writes_points_and_manifest(tmp_path):
    out = tmp_path / "cap.safetensors"
    r = invoke(
        "capture",
        CKPT,
        "--inputs",
        INPUTS,
        "--convention",
        "transformers",
        "--points",
        "img/block00/*,llm/*/out",
        "-o",
        out,
        "--json",
    )
    assert r.exit_code == 0, r.stderr
    tensors, manifest = read_capture(str(out))
    cfg = TINY_VARIANTS["tiny-pg2-gqa"]
    want = ["img/block00/attn", "img/block00/out"] + [pts.llm_block_out(i) for i in range(cfg.text.depth)] + ["logits"]
    assert list(tensors) == want == manifest["points"]
    assert tensors["logits"].shape == (2, cfg.num_image_tokens + 20, cfg.text.vocab_size)
    assert manifest["conventions"]["position_origin"] == 1 and manifest["conventions"]["final_softcap"] == "always"
    assert manifest["checkpoint"]["sha256"] == file_sha256(CKPT)
    assert manifest["config"]["name"] == "tiny-pg2-gqa" and manifest["dtype"] == "float32"
    assert {"numpy", "torch", "python"} <= set(manifest["libraries"])
    assert json.loads(r.stdout)["output"] == str(out)


def test_capture_refuses_existing_output_and_empty_selection(tmp_path):
    out = tmp_path / "cap.safetensors"
    out.write_text("x")
    r = invoke("capture", CKPT, "--inputs", INPUTS, "-o", out)
    assert r.exit_code == 2 and "--overwrite" in r.stderr
    r = invoke("capture", CKPT, "--inputs", INPUTS, "-o", tmp_path / "b.safetensors", "--points", "nothing/*")
    assert r.exit_code == 2 and "matches no capture point" in r.stderr
    assert not os.path.exists(tmp_path / "b.safetensors")


def test_generate_json_rows():
    r = invoke(
        "generate",
        CKPT,
        "--inputs",
        INPUTS,
        "--max-new-tokens",
        "5",
        "--json",
        "--tokenizer",
        os.path.join(GOLDEN, "tokenizer.model"),
    )
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert [row["row"] for row in rep["rows"]] == [0, 1]
    for row in rep["rows"]:
        assert 1 <= len(row["tokens"]) <= 5 and isinstance(row["text"], str)
        assert all(0 <= t < TINY_VARIANTS["tiny-pg2-gqa"].text.vocab_size for t in row["tokens"])
    assert rep["manifest"]["sampling"]["greedy"] is True


def test_generate_sampling_is_seeded():
    args = (
        "generate",
        CKPT,
        "--inputs",
        INPUTS,
        "--max-new-tokens",
        "6",
        "--json",
        "--sample",
        "--temperature",
        "2.0",
        "--top-k",
        "50",
    )
    a, b = invoke(*args, "--seed", "3"), invoke(*args, "--seed", "3")
    assert a.exit_code == 0, a.stderr
    rows = lambda r: [x["tokens"] for x in json.loads(r.stdout)["rows"]]
    assert rows(a) == rows(b)
    assert json.loads(a.stdout)["manifest"]["sampling"]["greedy"] is False


def _bad_inputs(tmp_path, **changes):
    inputs = dict(load_inputs(INPUTS))
    for k, v in changes.items():
        if v is None:
            inputs.pop(k)
        else:
            inputs[k] = v
    path = tmp_path / "bad.npz"
    np.savez(path, **inputs)
    return path


def test_inputs_missing_key(tmp_path):
    p = _bad_inputs(tmp_path, mask_ar=None)
    r = invoke("generate", CKPT, "--inputs", p, "--max-new-tokens", "2")
    assert r.exit_code == 2 and "bad.npz" in r.stderr and "mask_ar" in r.stderr


def test_inputs_wrong_image_size(tmp_path):
    p = _bad_inputs(tmp_path, image=np.zeros((2, 56, 56, 3), np.float32))
    r = invoke("capture", CKPT, "--inputs", p, "-o", tmp_path / "c.safetensors")
    assert r.exit_code == 2 and "image" in r.stderr and "28" in r.stderr and "56" in r.stderr
    assert not os.path.exists(tmp_path / "c.safetensors")


def test_inputs_token_out_of_vocab(tmp_path):
    text = load_inputs(INPUTS)["text"].copy()
    text[0, 3] = 512
    p = _bad_inputs(tmp_path, text=text)
    r = invoke("generate", CKPT, "--inputs", p, "--max-new-tokens", "2")
    assert r.exit_code == 2 and "text" in r.stderr and "512" in r.stderr


def test_inputs_wrong_dtype(tmp_path):
    p = _bad_inputs(tmp_path, mask_ar=load_inputs(INPUTS)["mask_ar"].astype(np.float32))
    r = invoke("generate", CKPT, "--inputs", p, "--max-new-tokens", "2")
    assert r.exit_code == 2 and "mask_ar" in r.stderr and "float32" in r.stderr


def test_checkpoint_does_not_match_config(tmp_path):
    r = invoke("generate", CKPT, "--inputs", INPUTS, "--max-new-tokens", "2", "--config", "tiny-pg1-mqa")
    assert r.exit_code == 2 and "tiny-pg1-mqa" in r.stderr and "expected" in r.stderr


def test_inputs_roundtrip_through_safetensors(tmp_path):
    save_inputs(tmp_path / "in.safetensors", load_inputs(INPUTS))
    a = invoke("generate", CKPT, "--inputs", INPUTS, "--max-new-tokens", "4", "--json")
    b = invoke("generate", CKPT, "--inputs", tmp_path / "in.safetensors", "--max-new-tokens", "4", "--json")
    assert json.loads(a.stdout)["rows"] == json.loads(b.stdout)["rows"]


def test_inputs_command_matches_the_processor(tmp_path):
    from PIL import Image

    from parity.processor import Tokenizer, build_inputs

    img = tmp_path / "a.png"
    Image.fromarray((np.arange(40 * 30 * 3) % 251).astype(np.uint8).reshape(40, 30, 3)).save(img)
    tok = os.path.join(GOLDEN, "tokenizer.model")
    r = invoke(
        "inputs",
        img,
        img,
        "--prefix",
        "caption en",
        "--prefix",
        "answer en what is this?",
        "--tokenizer",
        tok,
        "--config",
        "tiny-pg2-gqa",
        "-o",
        tmp_path / "in.npz",
        "--json",
    )
    assert r.exit_code == 0, r.stderr
    got = load_inputs(tmp_path / "in.npz")
    want = build_inputs(
        [str(img)] * 2,
        ["caption en", "answer en what is this?"],
        tokenizer=Tokenizer(tok),
        config=TINY_VARIANTS["tiny-pg2-gqa"],
    )
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    r = invoke(
        "inputs",
        img,
        img,
        "--prefix",
        "a",
        "--prefix",
        "b",
        "--prefix",
        "c",
        "--tokenizer",
        tok,
        "--config",
        "tiny-pg2-gqa",
        "-o",
        tmp_path / "x.npz",
    )
    assert r.exit_code == 2 and "--prefix" in r.stderr and not os.path.exists(tmp_path / "x.npz")


def test_capture_is_the_same_from_npz_and_safetensors(tmp_path):
    """The model loads through the spec from either format: identical logits, bit for bit."""
    from converters.convert import convert

    convert(CKPT, tmp_path / "hf", "safetensors")
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert invoke("capture", CKPT, "--inputs", INPUTS, "-o", a, "--points", "logits").exit_code == 0
    assert invoke("capture", tmp_path / "hf", "--inputs", INPUTS, "-o", b, "--points", "logits").exit_code == 0
    (ta, _), (tb, _) = read_capture(str(a)), read_capture(str(b))
    assert ta["logits"].tobytes() == tb["logits"].tobytes()


def test_capture_in_bfloat16(tmp_path):
    out32, out16 = tmp_path / "f32.safetensors", tmp_path / "bf16.safetensors"
    assert invoke("capture", CKPT, "--inputs", INPUTS, "-o", out32, "--points", "logits").exit_code == 0
    r = invoke("capture", CKPT, "--inputs", INPUTS, "-o", out16, "--points", "logits", "--dtype", "bfloat16")
    assert r.exit_code == 0, r.stderr
    (a, _), (b, m) = read_capture(str(out32)), read_capture(str(out16))
    assert m["dtype"] == "bfloat16"
    rel = np.abs(a["logits"] - b["logits"]).max() / np.abs(a["logits"]).max()
    assert 0 < rel < 0.1  # bf16 rounding moves the logits, but only by bf16-sized amounts
