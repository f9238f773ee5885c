"""Images and text → the arrays of an inputs file (`parity.inputs`), the way big_vision builds them.

    tokens    = [<bos>] + enc(prefix) + enc("\\n") + (enc(suffix) + [<eos>] if a suffix is given)
    mask_ar   =   0          0…0          0            1…1            1        (padding: 1)
    mask_loss =   0          0…0          0            1…1            1        (padding: 0; only with suffixes)

Each piece is tokenized on its own (big_vision `combine_and_keep_*`, architecture.md §3.1), so the separator can never
merge with the prefix or the suffix. Hugging Face's `PaliGemmaProcessor` tokenizes `"<bos>" + prefix + "\\n"` as one
string and the suffix + `"<eos>"` as a second; `tests/test_processor.py` checks that the ids agree and lists where
they cannot (text that spells a special token such as `"<eos>"`, `"<image>"` or `"<loc0001>"`).

Images are squashed to size×size with PIL (no aspect preservation, like big_vision and transformers) and mapped to
[-1, 1] with exactly transformers' arithmetic (see `PIXEL_VALUES`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .config import PaliGemmaConfig
from .errors import InputsError, describe
from .inputs import BOS_ID, EOS_ID, PAD_ID, validate_inputs

SEPARATOR = "\n"
RESAMPLE = ("bilinear", "bicubic")

# uint8 → float32 in [-1, 1], as transformers computes it: rescale in float64 (`x * (1/255)`), cast to float32, then
# normalize in float32 (`(x - 0.5) / 0.5`, mean = std = 0.5). big_vision's `value_range(-1, 1)` (`-1 + 2·(x/255)` in
# float32) and the colab's `x/127.5 - 1` in float32 give bit-identical values for all 256 inputs (tests check this).
# Computing `x/127.5 - 1` (or `(x/255 - 0.5)/0.5`) wholly in float64 and casting at the end does NOT: it differs for
# x = 64…191 (128 of 256 values), by up to 5.92e-8 (< 2^-24; up to 127 ulps of the small values near x = 127.5),
# because it skips the float32 rounding of x/255 that every real pipeline performs.
PIXEL_VALUES = ((np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32) - np.float32(0.5)) / np.float32(0.5)
PIXEL_VALUES.setflags(write=False)


def load_image(image: str | os.PathLike | np.ndarray | Any, size: int, resample: str = "bilinear") -> np.ndarray:
    """A file path, a PIL image or a uint8 array ([H, W], [H, W, 3] or [H, W, 4]) → float32[size, size, 3] in [-1, 1].

    Files are EXIF-transposed (as transformers' `load_image` does) and every image is converted to RGB by PIL (alpha
    dropped, not composited). `resample` is PIL's filter, which antialiases when shrinking: "bilinear" is closest to
    big_vision's `tf.image.resize(..., antialias=True)`; "bicubic" is what transformers' SiglipImageProcessor uses.
    """
    from PIL import Image, ImageOps

    if resample not in RESAMPLE:
        raise InputsError(describe("<load_image>", "resample", " or ".join(RESAMPLE), repr(resample)))
    name = "<array>"
    if isinstance(image, (str, os.PathLike)):
        name = str(image)
        try:
            with Image.open(image) as f:
                pil = ImageOps.exif_transpose(f)  # also forces the lazy decode while the file is open
        except (OSError, ValueError) as e:
            raise InputsError(describe(name, what=f"cannot read the image: {e}")) from None
    elif isinstance(image, Image.Image):
        name, pil = "<PIL image>", image
    else:
        a = np.asarray(image)
        if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
            raise InputsError(
                describe(
                    name,
                    "image",
                    "uint8[H, W], uint8[H, W, 3] or uint8[H, W, 4]",
                    f"{a.dtype}[{', '.join(map(str, a.shape))}]",
                )
            )
        pil = Image.fromarray(a)
    pil = pil.convert("RGB")
    if pil.size != (size, size):
        pil = pil.resize((size, size), resample=getattr(Image.Resampling, resample.upper()))
    return PIXEL_VALUES[np.asarray(pil, dtype=np.uint8)]


class Tokenizer:
    """A SentencePiece model with Gemma's special ids (pad 0, eos 1, bos 2); `encode` adds neither bos nor eos."""

    bos_id, eos_id, pad_id = BOS_ID, EOS_ID, PAD_ID

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm

        self.path = Path(path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise InputsError(describe(self.path, what=f"not a SentencePiece model: {e}")) from None
        found = dict(pad=self.sp.pad_id(), eos=self.sp.eos_id(), bos=self.sp.bos_id())
        wanted = dict(pad=PAD_ID, eos=EOS_ID, bos=BOS_ID)
        if found != wanted:
            raise InputsError(describe(self.path, "special ids", wanted, found, "not a Gemma-style tokenizer"))

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def tokenize(tokenizer: Tokenizer, prefix: str, suffix: str | None = None) -> tuple[list[int], list[int]]:
    """(tokens, mask_ar) of one example, unpadded."""
    head = [BOS_ID] + tokenizer.encode(prefix) + tokenizer.encode(SEPARATOR)
    tail = [] if suffix is None else tokenizer.encode(suffix) + [EOS_ID]
    return head + tail, [0] * len(head) + [1] * len(tail)


def build_inputs(
    images: Sequence[Any],
    prefixes: Sequence[str] | str,
    suffixes: Sequence[str | None] | None = None,
    *,
    tokenizer: Tokenizer,
    config: PaliGemmaConfig,
    resample: str = "bilinear",
    text_len: int | None = None,
) -> dict[str, np.ndarray]:
    """One example per image → validated {image, text, mask_ar, mask_input[, mask_loss]} (see `parity.inputs`).

    `images` are anything `load_image` takes; a suffix of None (or `suffixes=None`) means no suffix and no <eos>
    (inference), while "" gives a lone <eos>. Rows are right-padded to `text_len` (default: the longest row) with
    pad 0, mask_input 0 and mask_ar 1. When any suffix is given, the batch is a training batch and carries
    `mask_loss` (big_vision's fine-tuning guide): 1 on the suffix and its <eos>, 0 on <bos>, prefix, separator and
    padding (a row without a suffix has no loss token).
    """
    if isinstance(prefixes, str):
        prefixes = [prefixes]
    if suffixes is None or isinstance(suffixes, str):
        suffixes = [suffixes] * len(prefixes)
    if not (len(images) == len(prefixes) == len(suffixes)):
        raise InputsError(
            describe(
                "<build_inputs>",
                "prefixes",
                "one image, prefix and suffix per example",
                f"{len(images)} images, {len(prefixes)} prefixes, {len(suffixes)} suffixes",
            )
        )
    if not prefixes:
        raise InputsError(describe("<build_inputs>", "prefixes", "at least one example", "none"))
    if tokenizer.vocab_size > config.text.vocab_size:
        raise InputsError(
            describe(
                tokenizer.path,
                "vocab_size",
                f"<= {config.text.vocab_size} ({config.name})",
                tokenizer.vocab_size,
                "tokenizer larger than the model's vocabulary",
            )
        )
    rows = [tokenize(tokenizer, p, s) for p, s in zip(prefixes, suffixes)]
    longest = max(len(t) for t, _ in rows)
    t_len = longest if text_len is None else text_len
    if longest > t_len:
        raise InputsError(describe("<build_inputs>", "text_len", f">= {longest} (the longest example)", t_len))
    b = len(rows)
    text = np.full((b, t_len), PAD_ID, np.int32)
    mask_ar = np.ones((b, t_len), np.int32)
    mask_input = np.zeros((b, t_len), np.int32)
    mask_loss = np.zeros((b, t_len), np.int32)
    for i, (tokens, ar) in enumerate(rows):
        text[i, : len(tokens)], mask_ar[i, : len(ar)], mask_input[i, : len(tokens)] = tokens, ar, 1
        mask_loss[i, : len(ar)] = ar  # the suffix and its <eos> are exactly the mask_ar 1 tokens of a row
    size = config.vision.image_size
    image = np.stack([load_image(im, size, resample) for im in images])
    batch = dict(image=image, text=text, mask_ar=mask_ar, mask_input=mask_input)
    if any(s is not None for s in suffixes):
        batch["mask_loss"] = mask_loss
    return validate_inputs(batch, config, path="<build_inputs>")


def read_jsonl(path: str | os.PathLike, image_dir: str | os.PathLike | None = None) -> tuple[list, list, list]:
    """The training examples of a JSONL file as big_vision's fine-tuning guide writes them, one JSON object a line:
    `{"image": FILE, "prefix": TEXT, "suffix": TEXT}` (FILE relative to `image_dir`, default the file's directory;
    blank lines skipped) -> (image paths, prefixes, suffixes). A line that is not such an object, lacks a key, or
    names an image that does not exist is an InputsError naming the file and line number."""
    import json

    path = Path(path)
    base = Path(image_dir) if image_dir is not None else path.parent
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputsError(describe(path, what=f"cannot read the JSONL file: {e}")) from None
    images, prefixes, suffixes = [], [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}: line {n}"
        try:
            ex = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputsError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(ex, dict):
            raise InputsError(f'{where}: expected an object {{"image", "prefix", "suffix"}}, found {type(ex).__name__}')
        for key in ("image", "prefix", "suffix"):
            if key not in ex:
                what = "no suffix (a training example needs its target text)" if key == "suffix" else f"no {key!r}"
                raise InputsError(f"{where}: {what}; keys found: {', '.join(map(str, ex)) or 'none'}")
            if not isinstance(ex[key], str):
                raise InputsError(f"{where}: {key!r} must be a string, found {type(ex[key]).__name__}")
        image = base / ex["image"]
        if not image.is_file():
            raise InputsError(f"{where}: image {ex['image']!r} not found (looked for {image})")
        images.append(str(image))
        prefixes.append(ex["prefix"])
        suffixes.append(ex["suffix"])
    if not images:
        raise InputsError(describe(path, what="no examples (every line is blank)"))
    return images, prefixes, suffixes


def decode_tokens(tokenizer: Tokenizer, ids: Sequence[int] | np.ndarray) -> str:
    """Text of generated ids, cut before the first <eos> (big_vision `to_str`); pad/bos decode to nothing."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if EOS_ID in ids:
        ids = ids[: ids.index(EOS_ID)]
    return tokenizer.decode(ids)
