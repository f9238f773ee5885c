"""parity.processor against transformers' PaliGemmaProcessor, with the tiny tokenizer golden/tokenizer.model.

Where the two can differ: HF tokenizes `"<bos>" + prefix + "\\n"` as one string (and `suffix + "<eos>"` as another),
big_vision tokenizes bos, prefix, "\\n" and suffix separately. With the tiny tokenizer "\\n" is a user-defined piece,
so nothing can merge across the boundary and the ids agree for every text that does not spell a special token. With
the real Gemma tokenizer "\\n" is an ordinary piece (108) next to pieces such as "\\n\\n" (109), so a prefix ending
in "\\n" can merge with the separator in HF's joint encoding only; and in both tokenizers, text that spells a token
HF registers as special or added (`<eos>`, `<bos>`, `<image>`, `<loc0001>` with the tiny one) becomes that one id in
HF but ordinary characters in SentencePiece (`test_special_token_text_is_a_known_difference`).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest

from parity.config import TINY_VARIANTS
from parity.errors import InputsError
from parity.inputs import validate_inputs
from parity.processor import PIXEL_VALUES, Tokenizer, build_inputs, decode_tokens, load_image, tokenize

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "golden" / "tokenizer.model"
CFG = TINY_VARIANTS["tiny-pg2-gqa"]
SIZE = CFG.vision.image_size

CASES = [  # (prefix, suffix); None = no suffix (inference)
    ("caption en", None),
    ("answer en what is in the image?", "a cat"),
    ("answer en how many dogs are there?", "12"),
    ("detect cat ; dog", "there are 3 apples and 12 oranges"),
    ("  two  spaces ", " lead and trail  "),
    ("ünïcødé 😀 ein hund läuft", "un gato — ¿sí?"),
    ("caption en", ""),  # empty suffix: a lone <eos>
    ("", "x"),  # empty prefix
    ("tab\there", "multi\nline\n\nsuffix"),
    ("2024-01-31 10:45", "9876543210"),
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def hf():
    """PaliGemmaProcessor built offline from the tiny SentencePiece file (it adds `<image>` = 512 and loc/seg)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("PIL")
    from transformers import GemmaTokenizer, PaliGemmaProcessor

    try:  # the PIL backend: transformers >= 5 (the plain class needs torchvision there)
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil as ImageProcessor
    except ImportError:  # transformers 4.x: SiglipImageProcessor is the PIL one
        from transformers import SiglipImageProcessor as ImageProcessor
    if hasattr(GemmaTokenizer, "convert_to_native_format"):  # 5.x: constructing from vocab_file alone does not read it
        hf_tok = GemmaTokenizer(**GemmaTokenizer.convert_to_native_format(vocab_file=str(TOKENIZER)))
    else:
        hf_tok = GemmaTokenizer(vocab_file=str(TOKENIZER))
    assert len(hf_tok) == 512, transformers.__version__
    images = ImageProcessor(
        size={"height": SIZE, "width": SIZE},
        resample=3,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    images.image_seq_length = CFG.num_image_tokens
    proc = PaliGemmaProcessor(image_processor=images, tokenizer=hf_tok)
    assert proc.image_token_id == CFG.image_token_id == 512
    return proc


def rgb(h=40, w=30, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def hf_rows(hf, prefixes, suffixes):
    """HF ids per row with the `<image>` placeholders and padding removed, and the token_type_ids kept alongside."""
    out = hf(
        images=[rgb() for _ in prefixes],
        text=["<image>" + p for p in prefixes],
        suffix=None if suffixes is None else list(suffixes),
        padding="longest",
    )
    rows = []
    for ids, types, keep in zip(out["input_ids"], out["token_type_ids"], out["attention_mask"]):
        real = [i for i, k in zip(ids, keep) if k]
        assert real[: CFG.num_image_tokens] == [hf.image_token_id] * CFG.num_image_tokens  # then text only
        pairs = [(i, t) for i, t, k in zip(ids, types, keep) if k and i != hf.image_token_id]
        rows.append(([i for i, _ in pairs], [t for _, t in pairs]))
    return rows


# -- tokenizer file ---------------------------------------------------------------------------------------------
def test_tokenizer_file_is_reproducible_and_fits_the_tiny_vocab(tok):
    sys.path.insert(0, str(ROOT / "golden"))
    try:
        import make_tokenizer
    finally:
        sys.path.pop(0)
    assert make_tokenizer.train() == TOKENIZER.read_bytes()
    assert tok.vocab_size == 512 <= CFG.text.vocab_size
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert tok.encode("\n") == [5]
    for text in ["caption en", " x  y ", "ünïcødé 😀", "a\n\nb", "\t1234"]:
        assert tok.decode(tok.encode(text)) == text


def test_tokenizer_with_other_special_ids_is_refused(tmp_path):
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["a cat on a bench"] * 20),
        model_writer=buf,
        vocab_size=20,
        model_type="bpe",
        minloglevel=2,
    )  # unk 0, bos 1, eos 2
    p = tmp_path / "llama.model"
    p.write_bytes(buf.getvalue())
    with pytest.raises(InputsError, match=r"llama.model: key 'special ids'.*expected.*'bos': 2.*found.*'bos': 1"):
        Tokenizer(p)
    with pytest.raises(InputsError, match="not a SentencePiece model"):
        Tokenizer(tmp_path)


# -- token ids against HF ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix,suffix", CASES)
def test_ids_match_hf_processor(hf, tok, prefix, suffix):
    [(ids, types)] = hf_rows(hf, [prefix], None if suffix is None else [suffix])
    tokens, mask_ar = tokenize(tok, prefix, suffix)
    assert tokens == ids
    assert mask_ar == types  # HF token_type_ids: 0 = bos/prefix/"\n", 1 = suffix + eos


def test_batch_matches_hf_processor(hf, tok):
    prefixes = [p for p, _ in CASES]
    suffixes = [s or "" for _, s in CASES]  # HF takes no per-row None
    hf_ids = hf_rows(hf, prefixes, suffixes)
    x = build_inputs([rgb(seed=i) for i in range(len(CASES))], prefixes, suffixes, tokenizer=tok, config=CFG)
    for row, (ids, types) in enumerate(hf_ids):
        n = int(x["mask_input"][row].sum())
        assert x["text"][row, :n].tolist() == ids
        assert x["mask_ar"][row, :n].tolist() == types


def test_special_token_text_is_a_known_difference(hf, tok):
    """HF parses special/added tokens inside the text; SentencePiece (big_vision) encodes their characters."""
    for prefix, hf_id in [("say <eos> now", 1), ("box <loc0001>", hf.tokenizer.convert_tokens_to_ids("<loc0001>"))]:
        [(ids, _)] = hf_rows(hf, [prefix], None)
        ours, _ = tokenize(tok, prefix)
        assert hf_id in ids and hf_id not in ours and len(ours) > len(ids)
        assert tok.decode(ours[1:-1]) == prefix  # big_vision keeps the text as written


# -- layout -----------------------------------------------------------------------------------------------------
def test_build_inputs_layout(tok):
    x = build_inputs(
        [rgb(), rgb(seed=1)],
        ["caption en", "answer en what is in the image?"],
        [None, "a cat"],
        tokenizer=tok,
        config=CFG,
        text_len=16,
    )
    sep = tok.encode("\n")
    row0 = [2] + tok.encode("caption en") + sep
    row1 = [2] + tok.encode("answer en what is in the image?") + sep + tok.encode("a cat") + [1]
    n_pre1 = len(row1) - len(tok.encode("a cat")) - 1
    assert x["text"].shape == (2, 16) and x["text"].dtype == np.int32
    assert x["text"][0].tolist() == row0 + [0] * (16 - len(row0))
    assert x["text"][1].tolist() == row1 + [0] * (16 - len(row1))
    assert x["mask_input"][0].tolist() == [1] * len(row0) + [0] * (16 - len(row0))
    assert x["mask_ar"][0].tolist() == [0] * len(row0) + [1] * (16 - len(row0))  # padding: 1
    assert x["mask_ar"][1].tolist() == [0] * n_pre1 + [1] * (16 - n_pre1)
    assert x["image"].shape == (2, SIZE, SIZE, 3) and x["image"].dtype == np.float32
    np.testing.assert_array_equal(x["image"][1], load_image(rgb(seed=1), SIZE))
    validate_inputs(x, CFG)


def test_build_inputs_errors(tok):
    with pytest.raises(InputsError, match="key 'prefixes'.*at least one"):
        build_inputs([], [], tokenizer=tok, config=CFG)
    with pytest.raises(InputsError, match="2 images, 1 prefixes"):
        build_inputs([rgb(), rgb()], ["caption en"], tokenizer=tok, config=CFG)
    with pytest.raises(InputsError, match=r"key 'text_len'.*found 3"):
        build_inputs([rgb()], "caption en", tokenizer=tok, config=CFG, text_len=3)
    small = TINY_VARIANTS["tiny-pg1-mqa"]
    import dataclasses

    tiny = dataclasses.replace(small, text=dataclasses.replace(small.text, vocab_size=256))
    with pytest.raises(InputsError, match=r"tokenizer.model: key 'vocab_size'.*expected <= 256.*found 512"):
        build_inputs([rgb()], "caption en", tokenizer=tok, config=tiny)


def test_decode_tokens_cuts_at_first_eos(tok):
    ids = tok.encode("a cat") + [1] + tok.encode("junk") + [1, 0, 0]
    assert decode_tokens(tok, np.array(ids)) == "a cat"
    assert decode_tokens(tok, [2] + tok.encode("two dogs")) == "two dogs"  # no eos: everything; bos decodes to ""
    assert decode_tokens(tok, [1]) == ""


# -- images -----------------------------------------------------------------------------------------------------
def test_pixel_values_are_transformers_arithmetic():
    from transformers.image_transforms import normalize, rescale

    x = np.arange(256, dtype=np.uint8).reshape(1, 256, 1).repeat(3, axis=2)
    hf = normalize(rescale(x, 1 / 255), mean=0.5, std=0.5, input_data_format="channels_last")
    assert hf.dtype == np.float32
    np.testing.assert_array_equal(PIXEL_VALUES, hf[0, :, 0])
    v = np.arange(256, dtype=np.float32)
    np.testing.assert_array_equal(PIXEL_VALUES, np.float32(-1) + v / np.float32(255) * np.float32(2))  # BV pp
    np.testing.assert_array_equal(PIXEL_VALUES, v / np.float32(127.5) - np.float32(1))  # BV colab, float32
    exact = (np.arange(256) / 127.5 - 1).astype(np.float32)  # all in float64, one final cast: not the same
    diff = np.nonzero(exact != PIXEL_VALUES)[0]
    assert diff.tolist() == list(range(64, 192))
    assert 5.9e-8 < np.abs(exact - PIXEL_VALUES).max() < 2.0**-24
    assert PIXEL_VALUES[0] == -1 and PIXEL_VALUES[255] == 1


@pytest.mark.parametrize("resample,pil", [("bicubic", 3), ("bilinear", 2)])
@pytest.mark.parametrize("shape", [(40, 30), (28, 28), (13, 57)])
def test_image_matches_siglip_image_processor(hf, resample, pil, shape):
    img = rgb(*shape, seed=shape[0])
    ref = hf.image_processor(img, resample=pil, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ours = load_image(img, SIZE, resample)
    assert ours.shape == (SIZE, SIZE, 3) and ours.dtype == np.float32 and ref.dtype == np.float32
    np.testing.assert_array_equal(ours, ref)  # bit-identical: the same PIL resize, the same arithmetic


def test_load_image_sources(tmp_path):
    from PIL import Image

    img = rgb()
    Image.fromarray(img).save(tmp_path / "a.png")
    ref = load_image(img, SIZE, "bicubic")
    np.testing.assert_array_equal(load_image(tmp_path / "a.png", SIZE, "bicubic"), ref)
    np.testing.assert_array_equal(load_image(str(tmp_path / "a.png"), SIZE, "bicubic"), ref)
    np.testing.assert_array_equal(load_image(Image.fromarray(img), SIZE, "bicubic"), ref)
    gray = load_image(img[..., 0], SIZE)
    assert gray.shape == (SIZE, SIZE, 3) and (gray[..., 0] == gray[..., 2]).all()
    rgba = np.concatenate([img, np.zeros_like(img[..., :1])], axis=-1)
    np.testing.assert_array_equal(load_image(rgba, SIZE), load_image(img, SIZE))  # alpha dropped
    assert load_image(img, SIZE).min() >= -1 and load_image(img, SIZE).max() <= 1


def test_load_image_errors(tmp_path):
    with pytest.raises(InputsError, match=r"key 'image'.*uint8\[H, W, 3\].*found float32\[4, 4, 3\]"):
        load_image(np.zeros((4, 4, 3), np.float32), SIZE)
    with pytest.raises(InputsError, match=r"key 'resample'.*found 'nearest'"):
        load_image(rgb(), SIZE, "nearest")
    (tmp_path / "x.png").write_bytes(b"not a png")
    with pytest.raises(InputsError, match="x.png: cannot read the image"):
        load_image(tmp_path / "x.png", SIZE)
