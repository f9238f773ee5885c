"""parity.inputs: every bad-input case gives one line naming the file, the key, expected and found; round trips."""

from __future__ import annotations

import os
import zipfile

import ml_dtypes
import numpy as np
import pytest

from parity.config import TINY_VARIANTS
from parity.errors import InputsError, OutputError
from parity.inputs import _umask, inputs_sha256, load_inputs, save_inputs, validate_inputs

CFG = TINY_VARIANTS["tiny-pg1-mqa"]  # image 28 px, vocab 512
PATH = "batch.npz"


def good(b=2, t=6):
    rng = np.random.default_rng(0)
    text = rng.integers(3, CFG.text.vocab_size, (b, t)).astype(np.int32)
    text[:, 0] = 2
    mask_ar = np.zeros((b, t), np.int32)
    mask_ar[:, t - 2 :] = 1
    mask_input = np.ones((b, t), np.int32)
    mask_input[b - 1, t - 1] = 0
    text[b - 1, t - 1] = 0
    image = rng.uniform(-1, 1, (b, 28, 28, 3)).astype(np.float32)
    return dict(image=image, text=text, mask_ar=mask_ar, mask_input=mask_input)


def bad(inputs, key, *fragments, config=CFG, path=PATH):
    """Validation fails with one line naming the path and key, with expected/found and the given fragments."""
    with pytest.raises(InputsError) as e:
        validate_inputs(inputs, config, path)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert msg.startswith(str(path)), msg
    assert f"key {key!r}" in msg, msg
    assert "expected" in msg and "found" in msg, msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


def with_(key, value, **kw):
    x = good(**kw)
    x[key] = value
    return x


# -- accepted inputs --------------------------------------------------------------------------------------------
def test_good_inputs_pass_and_normalise_dtypes():
    x = good()
    out = validate_inputs(x, CFG, PATH)
    assert list(out) == ["image", "text", "mask_ar", "mask_input"]
    assert out["image"].dtype == np.float32 and out["text"].dtype == np.int32
    assert all(out[k].dtype == np.int32 for k in ("mask_ar", "mask_input"))
    for k in x:
        np.testing.assert_array_equal(out[k], x[k])


def test_mask_input_defaults_to_all_ones():
    x = good()
    del x["mask_input"]
    x["text"][1, -1] = 7
    out = validate_inputs(x, CFG)
    np.testing.assert_array_equal(out["mask_input"], np.ones_like(x["text"]))


def test_lossless_dtypes_are_accepted():
    x = good()
    x["text"] = x["text"].astype(np.int64)
    x["mask_ar"] = x["mask_ar"].astype(np.uint8)
    x["mask_input"] = x["mask_input"].astype(bool)
    x["image"] = x["image"].astype(np.float64)  # every value exactly a float32
    out = validate_inputs(x, CFG)
    np.testing.assert_array_equal(out["text"], good()["text"])
    assert out["image"].dtype == np.float32
    for dt in (np.float16, ml_dtypes.bfloat16):
        validate_inputs(with_("image", good()["image"].astype(dt)), CFG)


def test_small_overshoot_is_tolerated_without_clipping():
    x = good()
    x["image"][0, 0, 0, 0] = 1.0005
    assert validate_inputs(x, CFG)["image"][0, 0, 0, 0] == np.float32(1.0005)


# -- keys -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["image", "text", "mask_ar"])
def test_missing_key(key):
    x = good()
    del x[key]
    bad(x, key, "missing key", "keys image, text, mask_ar")


def test_unexpected_key():
    bad(with_("labels", np.zeros((2, 6), np.int32)), "labels", "unexpected key", "only keys")


# -- shapes and dtypes ------------------------------------------------------------------------------------------
def test_image_wrong_rank():
    bad(
        with_("image", np.zeros((28, 28, 3), np.float32)),
        "image",
        "wrong rank",
        "float32[28, 28, 3]",
        "float32[B, 28, 28, 3]",
    )


def test_image_channels_first():
    bad(with_("image", np.zeros((2, 3, 28, 28), np.float32)), "image", "NCHW", "float32[2, 3, 28, 28]")


def test_image_integer_dtype():
    bad(with_("image", np.zeros((2, 28, 28, 3), np.uint8)), "image", "uint8[2, 28, 28, 3]", "x/127.5 - 1")


def test_image_float64_not_representable():
    x = good()
    x["image"] = x["image"].astype(np.float64) + 1e-12
    x["image"] = np.clip(x["image"], -1, 1)
    bad(x, "image", "float64[2, 28, 28, 3]", "not a float32 value")


def test_text_wrong_rank():
    bad(with_("text", np.full((2, 6, 1), 2, np.int32)), "text", "wrong rank", "int32[2, 6, 1]")


def test_text_float_dtype():
    bad(with_("text", good()["text"].astype(np.float32)), "text", "wrong dtype", "float32[2, 6]")


def test_text_values_beyond_int32():
    t = good()["text"].astype(np.int64)
    t[0, 1] = 2**40
    bad(with_("text", t), "text", "fit int32", str(2**40))


def test_mask_shape_differs_from_text():
    bad(with_("mask_ar", np.zeros((2, 5), np.int32)), "mask_ar", "int32[2, 6]", "int32[2, 5]")


def test_batch_sizes_disagree_image_text():
    bad(
        with_("image", np.zeros((3, 28, 28, 3), np.float32)),
        "image",
        "batch sizes disagree",
        "batch size 2",
        "batch size 3",
    )


def test_batch_sizes_disagree_mask():
    bad(with_("mask_input", np.ones((1, 6), np.int32)), "mask_input", "batch sizes disagree", "int32[1, 6]")


def test_empty_rows():
    x = good()
    for k in ("text", "mask_ar", "mask_input"):
        x[k] = x[k][:, :0]
    bad(x, "text", "int32[2, 0]", "empty")


def test_empty_batch():
    x = good()
    x["image"] = x["image"][:0]
    bad(x, "image", "empty", "float32[0, 28, 28, 3]")


def test_image_size_differs_from_config():
    bad(
        with_("image", np.zeros((2, 32, 32, 3), np.float32)),
        "image",
        "float32[B, 28, 28, 3]",
        "float32[2, 32, 32, 3]",
        CFG.name,
    )


def test_image_size_free_without_config():
    validate_inputs(with_("image", np.zeros((2, 32, 32, 3), np.float32)), None)


# -- values -----------------------------------------------------------------------------------------------------
def test_image_out_of_range():
    x = good()
    x["image"][1, 2, 3, 0] = 1.01
    bad(x, "image", "out of range", "[-1, 1]", "max 1.01")


def test_image_in_0_255_gets_a_hint():
    bad(with_("image", np.full((2, 28, 28, 3), 200.0, np.float32)), "image", "x/127.5 - 1", "max 200")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_image_not_finite(value):
    x = good()
    x["image"][1, 4, 5, 2] = value
    bad(x, "image", "non-finite", "[1, 4, 5, 2]", str(np.float32(value)))


def test_negative_token():
    x = good()
    x["text"][0, 3] = -5
    bad(x, "text", ">= 0", "-5 at [0, 3]")


def test_token_beyond_vocab():
    x = good()
    x["text"][1, 2] = CFG.text.vocab_size
    bad(x, "text", "vocab_size 512", "512 at [1, 2]", CFG.name)


def test_first_token_not_bos():
    x = good()
    x["text"][1, 0] = 7
    bad(x, "text", "<bos> = 2", "7 in row 1")


@pytest.mark.parametrize("key", ["mask_ar", "mask_input"])
def test_mask_values_not_binary(key):
    x = good()
    x[key][0, 2] = 2
    bad(x, key, "0 or 1", "2 at [0, 2]")


def test_padding_not_only_at_the_end():
    x = good()
    x["mask_input"][0] = [1, 1, 0, 1, 1, 1]
    bad(x, "mask_input", "right padding", "row 0: padding at 2, token at 3")


def test_row_with_no_tokens():
    x = good()
    x["mask_input"][1] = 0
    bad(x, "mask_input", "no tokens", "row 1 all padding")


# -- files ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_round_trip(tmp_path, suffix):
    x = good()
    x["text"] = x["text"].astype(np.int64)  # saved as int32
    path = save_inputs(tmp_path / f"in{suffix}", x)
    y = load_inputs(path, CFG)
    assert list(y) == ["image", "text", "mask_ar", "mask_input"]
    for k in y:
        assert y[k].dtype == validate_inputs(x)[k].dtype
        np.testing.assert_array_equal(y[k], x[k])
    assert inputs_sha256(y) == inputs_sha256(x)
    assert os.listdir(tmp_path) == [f"in{suffix}"]  # no temporary left behind
    assert path.stat().st_mode & 0o044 == 0o044 & ~_umask()  # not mkstemp's 0600


def test_format_detected_from_content(tmp_path):
    x = good()
    a = save_inputs(tmp_path / "a.npz", x).read_bytes()
    b = save_inputs(tmp_path / "b.safetensors", x).read_bytes()
    (tmp_path / "a.bin").write_bytes(a)
    (tmp_path / "b.npz").write_bytes(b)  # safetensors bytes under an npz name
    for name in ("a.bin", "b.npz"):
        np.testing.assert_array_equal(load_inputs(tmp_path / name)["image"], x["image"])


def test_load_validates_with_file_name(tmp_path):
    x = good()
    x["text"][0, 0] = 9
    p = tmp_path / "in.npz"
    np.savez(p, **x)
    with pytest.raises(InputsError, match=rf"^{p}: key 'text'.*expected.*found 9 in row 0"):
        load_inputs(p, CFG)
    assert load_inputs(p, validate=False)["text"][0, 0] == 9


def test_unknown_and_corrupt_files(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not an array file at all")
    with pytest.raises(InputsError, match="junk.npz: unknown inputs format.*expected an npz"):
        load_inputs(junk)
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(save_inputs(tmp_path / "ok.safetensors", good()).read_bytes()[:200])
    with pytest.raises(InputsError, match="trunc.safetensors"):
        load_inputs(truncated)
    with pytest.raises(InputsError, match="missing.npz: cannot read"):
        load_inputs(tmp_path / "missing.npz")


def test_pickled_npz_is_refused(tmp_path):
    p = tmp_path / "obj.npz"
    np.savez(p, image=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputsError, match="obj.npz.*pickle"):
        load_inputs(p)
    assert zipfile.is_zipfile(p)


def test_save_rejects_unknown_suffix_and_invalid_inputs(tmp_path):
    with pytest.raises(OutputError, match="in.pt.*expected .npz or .safetensors"):
        save_inputs(tmp_path / "in.pt", good())
    x = good()
    x["mask_ar"][0, 0] = 5
    with pytest.raises(InputsError, match="key 'mask_ar'"):
        save_inputs(tmp_path / "in.npz", x)
    assert os.listdir(tmp_path) == []


def test_save_overwrite_flag(tmp_path):
    p = save_inputs(tmp_path / "in.npz", good())
    with pytest.raises(OutputError, match="exists"):
        save_inputs(p, good(), overwrite=False)
    save_inputs(p, good())


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_failed_write_leaves_nothing(tmp_path, monkeypatch, suffix):
    """A write that fails half-way (disk full) leaves neither the target nor a temporary, and keeps an old file."""
    p = tmp_path / f"in{suffix}"
    old = save_inputs(p, good(b=1)).read_bytes()

    def boom(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OutputError, match=rf"in{suffix}: cannot write.*No space left"):
        save_inputs(p, good())
    assert os.listdir(tmp_path) == [p.name] and p.read_bytes() == old
    monkeypatch.undo()
    q = tmp_path / "sub" / f"new{suffix}"
    with pytest.raises(OutputError, match=f"new{suffix}: cannot write"):  # directory does not exist
        save_inputs(q, good())
    assert not q.parent.exists()


def test_unwritable_directory(tmp_path):
    """/proc refuses new files even to root (CI runs as root, so directory permissions would not stop it)."""
    with pytest.raises(OutputError, match="cannot write|/proc"):
        save_inputs("/proc/parity-inputs.npz", good())
    assert not os.path.exists("/proc/parity-inputs.npz")


# -- digest -----------------------------------------------------------------------------------------------------
def test_sha256_is_canonical():
    x = good()
    h = inputs_sha256(x)
    assert h == inputs_sha256(good()) and len(h) == 64
    y = good()
    y["text"] = y["text"].astype(np.int64)
    assert inputs_sha256(y) == h
    z = good()
    z["mask_input"][1, -1] = 1
    z["text"][1, -1] = 7
    z2 = dict(z)
    del z2["mask_input"]
    assert inputs_sha256(z) == inputs_sha256(z2) != h
    w = good()
    w["image"][0, 0, 0, 0] = np.nextafter(w["image"][0, 0, 0, 0], np.float32(2))
    assert inputs_sha256(w) != h
