"""Train the tiny SentencePiece model the tests use: `golden/tokenizer.model` (512 pieces = the tiny configs' vocab).

    python golden/make_tokenizer.py [OUT]        # default: golden/tokenizer.model next to this script

It mirrors the Gemma tokenizer's settings (architecture.md §3.1) so that every code path of the real one is exercised:
BPE with byte fallback (any unicode text encodes), digits split, no dummy prefix, whitespace kept as is, identity
normalisation, and the special ids pad=0, eos=1, bos=2, unk=3, `<mask>`=4. `"\n"` (Gemma id 108, the prefix/suffix
separator) is a user-defined piece here (id 5), because SentencePiece reads its training corpus line by line and
so can never learn a piece that contains a newline. Training is single-threaded on a built-in corpus, so the
output is the same bytes on every run (`--check` verifies this against an existing file).

With exactly 512 pieces Hugging Face's `PaliGemmaProcessor` gives `<image>` the id 512 = `config.image_token_id`.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
from pathlib import Path

VOCAB_SIZE = 512
DEFAULT_OUT = Path(__file__).with_name("tokenizer.model")

# Task prompts in the style of PaliGemma's prefixes plus plain captions, so that BPE learns whole-word pieces.
_PROMPTS = """\
caption en
caption es
caption de
describe en
answer en what is in the image?
answer en how many dogs are there?
answer en what color is the car?
answer en where is the cat sitting?
question en what is the man holding?
detect cat ; dog
detect person ; bicycle ; car
segment the red apple
ocr
a cat sitting on a bench in the park
a dog running on the beach near the water
two people riding bicycles down a city street
a red car parked in front of a white house
a man holding an umbrella in the rain
a woman reading a book under a tree
a plate of food with rice and vegetables
an airplane flying over the mountains at sunset
a group of children playing football on the grass
the kitchen has a table, four chairs and a window
there are 3 apples and 12 oranges on the table
the train arrives at 10:45 on platform 7
a black and white photo of an old building
a small boat on a calm lake with trees in the background
the sign says stop in large red letters
a bowl of soup next to a glass of water
a street at night with lights and people walking
the quick brown fox jumps over the lazy dog
a horse standing in a field of green grass
snow covered mountains under a blue sky
a computer on a desk with a keyboard and a mouse
a bird sitting on the branch of a tree
the answer is yes
the answer is no
there is one cat in the image
there are two dogs and a cat
un gato sentado en un banco
ein hund läuft am strand
"""
CORPUS = _PROMPTS.splitlines() * 4  # repetition makes the frequent merges unambiguous


def train(vocab_size: int = VOCAB_SIZE) -> bytes:
    """The serialized model proto."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=out,
        vocab_size=vocab_size,
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        control_symbols=["<mask>"],
        user_defined_symbols=["\n"],
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
        hard_vocab_limit=True,
    )
    return out.getvalue()


def check(model: bytes) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model)
    ids = dict(pad=sp.pad_id(), eos=sp.eos_id(), bos=sp.bos_id(), unk=sp.unk_id(), mask=sp.piece_to_id("<mask>"))
    assert ids == dict(pad=0, eos=1, bos=2, unk=3, mask=4), ids
    assert sp.get_piece_size() == VOCAB_SIZE, sp.get_piece_size()
    assert sp.encode("\n") == [sp.piece_to_id("\n")], sp.encode("\n")
    for text in ["caption en", "  two  spaces ", "ünïcødé 😀 ok", "line\nbreak", "12345", ""]:
        assert sp.decode(sp.encode(text)) == text, text


def main(argv: list[str]) -> int:
    args = [a for a in argv if a != "--check"]
    out = Path(args[0]) if args else DEFAULT_OUT
    model = train()
    check(model)
    if "--check" in argv:
        same = out.read_bytes() == model
        print(f"{out}: {'identical to a fresh training run' if same else 'DIFFERS from a fresh training run'}")
        return 0 if same else 1
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    print(f"wrote {out} ({len(model)} bytes, {VOCAB_SIZE} pieces)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
