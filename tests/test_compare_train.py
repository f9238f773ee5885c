"""`parity compare --train-step` (issue 23): a training step compared point by point, forward and backward.

Independent computations only: torch against jax and against transformers (three implementations of one step,
under both presets: transformers' modules run big_vision's step too), a finite difference of the loss for the
activation gradients, and checkpoints with a change planted in one LLM block and in one ViT block, whose
teacher-forced backward must fail in that block only. Then the CLI's wording, exit codes and bad input, --save /
--rejudge and the HTML report."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np
import pytest
from click.testing import CliRunner

from converters.checkpoint import open_checkpoint
from parity import points as pts
from parity import spec
from parity.cli import main
from parity.compare.train_step import compare_train_step
from parity.config import TINY_VARIANTS
from parity.conventions import PRESETS
from parity.torch_impl import api as torch_api
from parity.training import TrainOptions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = os.path.join(ROOT, "golden", "tiny-pg1-mqa.npz")
CFG = TINY_VARIANTS["tiny-pg1-mqa"]
ALL = TrainOptions(trainable=("all",))
UNIT = re.compile(r"^(img/block\d+|llm/layer\d+)/")


def train_inputs(cfg, seed: int = 0) -> dict[str, np.ndarray]:
    """Three rows: different prefix and suffix lengths, two right-padded; mask_loss on the real suffix."""
    rng = np.random.default_rng(seed)
    length, prefix, total = (12, 8, 10), (3, 5, 7), 12
    text = rng.integers(3, cfg.text.vocab_size, (3, total)).astype(np.int32)
    text[:, 0] = 2
    mask_ar, mask_input = np.zeros_like(text), np.zeros_like(text)
    for r in range(3):
        mask_ar[r, prefix[r] : length[r]] = 1
        mask_input[r, : length[r]] = 1
        text[r, length[r] :] = 0
    image = rng.uniform(-1, 1, (3, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
    return dict(image=image, text=text, mask_ar=mask_ar, mask_input=mask_input, mask_loss=mask_ar * mask_input)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Training inputs, the same inputs without mask_loss, and checkpoints with a change planted in LLM block 1
    (its MLP output kernel x 1.01) and in ViT block 0 (its MLP output kernel x 1.01)."""
    d = tmp_path_factory.mktemp("train_cmp")
    x = train_inputs(CFG)
    np.savez(d / "train.npz", **x)
    np.savez(d / "forward.npz", **{k: v for k, v in x.items() if k != "mask_loss"})
    with open_checkpoint(CKPT) as ck:
        params = ck.load()
    for name, key, i in (
        ("llm1", "llm/layers/mlp/linear", 1),
        ("vit0", "img/Transformer/encoderblock/MlpBlock_0/Dense_1/kernel", 0),
    ):
        planted = {k: v.copy() for k, v in params.items()}
        planted[key][i] *= np.float32(1.01)
        np.savez(d / f"{name}.npz", **planted)
    return {k: str(d / f"{k}.npz") for k in ("train", "forward", "llm1", "vit0")}


# -- the points themselves ----------------------------------------------------------------------------------------
def test_activation_gradients_match_a_finite_difference():
    """grad/llm/layer01/in (the probe's gradient) against a central difference in float64 of the loss computed from
    that block's input on, at its largest element."""
    import torch

    from parity.torch_impl import backward as tb
    from parity.torch_impl import train

    x = train_inputs(CFG, seed=3)
    model = torch_api.build_model(CFG, PRESETS["big_vision"], dtype="float64", params=spec.random_params(CFG, seed=2))
    got = torch_api.train_points(model, x, ALL)
    g = got[pts.grad_llm_block_in(1)]
    at = np.unravel_index(np.argmax(np.abs(g)), g.shape)
    ctx = tb._context(model, train._batch(model, x))

    def loss_from(delta: float) -> float:
        z = got[pts.llm_block_out(0)].copy()
        z[at] += delta
        y = torch.as_tensor(z)
        with torch.no_grad():
            for unit in ("llm/layer01", pts.LLM_FINAL_NORM, pts.LOGITS):
                y, _ = tb._unit(model, unit, y, ctx)
        return float(y)

    h = 1e-5
    fd = (loss_from(h) - loss_from(-h)) / (2 * h)
    assert abs(fd - g[at]) <= 1e-7 * abs(g[at]) and abs(g[at]) > 1e-4


# -- sides that pass -------------------------------------------------------------------------------------------------
def test_torch_vs_jax_pass_teacher_forced_big_vision(files):
    c = compare_train_step("torch", "jax", ckpt=CKPT, inputs=files["train"], options=ALL, teacher_forced=True)
    assert c, c.verdict().words
    d = c.to_dict()
    assert d["passed"] and d["first_divergence"] is None and d["first_local_divergence"] is None
    names = [p["point"] for p in d["points"]]
    # forward, loss, backward from the head down, then the leaves
    assert names.index("logits") < names.index(pts.TRAIN_LOSS) < names.index(pts.GRAD_HEAD_IN)
    assert (
        names.index(pts.grad_llm_block_in(1)) < names.index(pts.grad_llm_block_in(0)) < names.index(pts.GRAD_PROJECTOR)
    )
    assert names.index(pts.grad_img_block_in(0)) < names.index("grad/llm/embedder/input_embedding")
    assert "grad/llm/layers/attn/q_einsum/w/layer01" in names
    assert all(p["local"] is not None for p in d["points"] if p["point"].startswith("grad/llm/layer"))
    key_bias = "grad/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/key/bias"
    assert any(n.startswith(key_bias) and "global gradient scale" in n for n in d["notes"])
    assert "llm_backward" in c.amplification() and c.amplification()["llm_backward"][0]["block"] == 1


def test_torch_vs_jax_pass_transformers_preset_two_steps(tmp_path):
    cfg = TINY_VARIANTS["tiny-pg2-gqa"]
    ckpt = os.path.join(ROOT, "golden", "tiny-pg2-gqa.b16.npz")
    np.savez(tmp_path / "train.npz", **train_inputs(cfg, seed=1))
    c = compare_train_step(
        "torch",
        "jax",
        ckpt=ckpt,
        inputs=str(tmp_path / "train.npz"),
        convention="transformers",
        options=TrainOptions(steps=2),
    )
    assert c, c.verdict().words
    names = {r.point for r in c.records}
    assert {pts.train_loss_at(2), pts.param_at("llm/layers/attn/q_einsum/w", 2)} <= names


def test_torch_vs_transformers_pass(files):
    """transformers as side A (its hooks' points and gradients), torch's units teacher-forced on them."""
    c = compare_train_step("transformers", "torch", ckpt=CKPT, inputs=files["train"], options=ALL, teacher_forced=True)
    assert c, c.verdict().words
    assert c.sides["A"]["manifest"]["conventions"]["loss_normalization"] == "per_token"
    compared = {r.point for r in c.records if r.stats is not None}
    assert {pts.grad_llm_block_in(0), pts.GRAD_PROJECTOR, pts.grad_img_block_in(0), pts.TRAIN_LOSS} <= compared


PG2 = TINY_VARIANTS["tiny-pg2-gqa"]
PG2_CKPT = os.path.join(ROOT, "golden", "tiny-pg2-gqa.b16.npz")


@pytest.fixture(scope="module")
def pg2_train(tmp_path_factory):
    """tiny-pg2-gqa (Gemma 2: final and attention softcaps, local layers) training inputs: rows 1 and 2 padded with
    mask_ar 0, so under big_vision's mask the <eos> of those rows sees their padding."""
    path = tmp_path_factory.mktemp("train_pg2") / "train.npz"
    np.savez(path, **train_inputs(PG2, seed=1))
    return str(path)


def test_torch_vs_transformers_pass_big_vision_cli(files):
    """`parity compare CKPT --a torch --b transformers --train-step --convention big_vision` (Gemma 1): every point,
    forward, loss and backward, passes; the transformers side trained under big_vision's normalisation."""
    args = ("compare", CKPT, "--a", "torch", "--b", "transformers", "--train-step", "--inputs", files["train"])
    r = invoke(*args, "--trainable", "all", "--convention", "big_vision", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["passed"] and d["first_divergence"] is None
    assert {p["point"] for p in d["points"] if p["stats"]} >= {pts.TRAIN_LOSS, pts.GRAD_PROJECTOR, pts.LOGITS}


@pytest.mark.parametrize("a", ["torch", "jax"])
def test_vs_transformers_pass_big_vision_gemma2(pg2_train, a):
    c = compare_train_step(a, "transformers", ckpt=PG2_CKPT, inputs=pg2_train, convention="big_vision", options=ALL)
    assert c, c.verdict().words
    conv = c.sides["B"]["manifest"]["conventions"]
    assert conv["loss_normalization"] == "per_example" and conv["final_softcap"] == "decode_only"
    compared = {r.point for r in c.records if r.stats is not None}
    assert {pts.TRAIN_LOSS, pts.TRAIN_EXAMPLE_LOSS, pts.grad_llm_block_in(0), pts.grad_img_block_in(0)} <= compared


@pytest.mark.parametrize("name", ["tiny-pg1-mqa", "tiny-pg2-gqa"])
def test_transformers_big_vision_step_at_every_position(name):
    """The compare judges only positions that reach the loss; here every position of every point, the <eos> that
    sees its row's padding and the padding itself included, from transformers' modules against torch's step
    (independent code), and transformers' loss against training.reference_loss (float64 numpy, big_vision's
    per-example definition) on its own logits. transformers' own masks (token_type_ids, attention_mask) on the
    same shifted sequence move the last block's output at those positions: the 4D mask is what makes them agree."""
    from parity import hf_side, hf_train
    from parity.training import reference_loss

    cfg, ckpt = TINY_VARIANTS[name], CKPT if name == "tiny-pg1-mqa" else PG2_CKPT
    x = train_inputs(cfg, seed=2)
    with open_checkpoint(ckpt) as ck:
        params = {k: np.asarray(v, np.float32) for k, v in ck.load().items()}
    bv = PRESETS["big_vision"]
    t = torch_api.train_points(torch_api.build_model(cfg, bv, params=params), x, ALL)
    model = hf_side.build_model(cfg, bv, params=params)
    h = hf_side.train_points(model, x, ALL)
    assert set(t) == set(h)
    scale = max(float(np.max(np.abs(v))) for k, v in t.items() if k.startswith("grad/") and "/layer" not in k[-8:])
    for k in t:
        bound = 1e-5 * (scale if "key/bias" in k else float(np.max(np.abs(t[k]))))  # the exactly-zero leaf: global
        assert float(np.max(np.abs(t[k] - h[k]))) <= bound, k
    loss, example = reference_loss(h[pts.LOGITS], x, bv)
    assert abs(float(h[pts.TRAIN_LOSS]) - loss) <= 1e-6 * loss
    np.testing.assert_allclose(h[pts.TRAIN_EXAMPLE_LOSS], example, rtol=1e-6)
    assert abs(loss - float(np.mean(example))) <= 1e-12 and np.ptp(x["mask_loss"].sum(1)) > 0  # rows differ
    # the <eos> of a padded row (its mask_ar 0 padding joins its group) and that padding: rows 1, 2
    last = pts.llm_block_out(cfg.text.depth - 1)
    eos = [(r, cfg.num_image_tokens + int(x["mask_input"][r].sum()) - 1) for r in (1, 2)]
    plain = hf_train.big_vision_batch

    def transformers_masks(model, inputs, causal):
        b = plain(model, inputs, causal)
        shifted = {k: v[:, :-1] for k, v in inputs.items() if k in ("text", "mask_ar", "mask_input")}
        own = hf_side.hf_batch(cfg, {"image": inputs["image"], **shifted}, "cpu")
        return {**own, "position_ids": b["position_ids"]}

    hf_train.big_vision_batch = transformers_masks
    try:
        wrong = hf_side.train_points(hf_side.build_model(cfg, bv, params=params), x, ALL)
    finally:
        hf_train.big_vision_batch = plain
    top = float(np.max(np.abs(t[last])))
    for r, q in eos:
        assert np.max(np.abs(wrong[last][r, q] - t[last][r, q])) > 1e-4 * top  # 10x the agreement bound above
        assert np.max(np.abs(wrong[last][r, q + 1 :] - t[last][r, q + 1 :])) > 1e-2 * top  # the padding


@pytest.mark.parametrize(
    "preset, setting",
    [("big_vision", "train_prefix=causal"), ("transformers", "loss_normalization=per_example")],
)
def test_transformers_trains_the_other_training_fields(preset, setting):
    """The training fields a preset does not set run on transformers too: big_vision with a causal prefix (a causal
    4D mask) and the transformers preset with the per-example loss (computed from its logits): loss and gradients
    as torch's, and not as under the preset alone."""
    from parity import hf_side

    x = train_inputs(CFG, seed=4)
    with open_checkpoint(CKPT) as ck:
        params = ck.load()
    name, value = setting.split("=")
    conv = dataclasses.replace(PRESETS[preset], **{name: value})
    options = TrainOptions()  # the guide's attention leaves
    t = torch_api.train_points(torch_api.build_model(CFG, conv, params=params), x, options)
    h = hf_side.train_points(hf_side.build_model(CFG, conv, params=params), x, options)
    plain = hf_side.train_points(hf_side.build_model(CFG, PRESETS[preset], params=params), x, options)
    assert abs(float(h[pts.TRAIN_LOSS]) - float(t[pts.TRAIN_LOSS])) <= 1e-6 * float(t[pts.TRAIN_LOSS])
    assert abs(float(h[pts.TRAIN_LOSS]) - float(plain[pts.TRAIN_LOSS])) > 1e-3
    for k in (k for k in t if k.startswith("grad/llm/layers/attn/")):
        assert float(np.max(np.abs(h[k] - t[k]))) <= 1e-5 * float(np.max(np.abs(t[k]))), k


def test_a_planted_block_is_named_by_transformers_under_big_vision(files):
    c = compare_train_step(
        ckpt=CKPT, against=files["llm1"], impl="transformers", inputs=files["train"], convention="big_vision"
    )
    assert not c and c.first_divergence == "llm/layer01/mlp"
    assert all(r.judgement for r in c.records if r.point.startswith(("img/", "llm/layer00/")))


# -- planted changes ------------------------------------------------------------------------------------------------
def _unit_of(point: str) -> str | None:
    if point.startswith(("grad/", "train/", "param/")):
        return pts.train_point_unit(point)
    m = UNIT.match(point)
    return m.group(1) if m else point


@pytest.mark.parametrize(
    "planted, unit, first",
    [("llm1", "llm/layer01", "llm/layer01/mlp"), ("vit0", "img/block00", "img/block00/out")],
)
def test_a_planted_block_fails_locally_alone(files, planted, unit, first):
    c = compare_train_step(
        ckpt=CKPT, against=files[planted], impl="torch", inputs=files["train"], options=ALL, teacher_forced=True
    )
    assert not c and c.first_divergence == first and c.first_local_divergence == first
    failing = [r.point for r in c.records if r.local_judgement is not None and not r.local_judgement]
    whole = [p for p in failing if _unit_of(p) is None]  # a stacked leaf's whole gradient holds that layer's
    assert failing and {_unit_of(p) for p in failing if p not in whole} == {unit}
    backward = pts.grad_llm_block_in(1) if planted == "llm1" else pts.grad_img_block_in(0)
    assert backward in failing
    assert all(pts.train_point_unit(p) != unit for p in whole)
    # every other unit's backward passes locally though its propagated gradient differs
    others = [r for r in c.records if r.local is not None and _unit_of(r.point) not in (unit, None)]
    assert others and all(r.local_judgement for r in others)
    assert any(not r.judgement for r in others if r.point.startswith("grad/"))
    assert c.verdict().first_differing_unit == unit


# -- --frozen-dtype float16: train.py's mixed precision, point by point ----------------------------------------------
HALF = TrainOptions(trainable=("llm/layers/*",), frozen_dtype="float16")  # the embedding frozen: float16-formed text


def test_frozen_float16_torch_vs_jax_and_against_the_other_train_step(tmp_path):
    """tiny-pg2-gqa (width 48: sqrt(D) is not a power of two, so the float16 text product rounds) under big_vision's
    convention: torch vs jax, propagated and teacher-forced, under the fp32 training bounds; each side's loss and
    gradient points against the OTHER implementation's `train-step` (its loop over train._loss, not the units): the
    loss within 1e-6 relative, each leaf's gradient within 3e-5 of its largest |g|. The float16 rounding moves the
    loss by far more than that, so a step that ignored --frozen-dtype (or rounded differently) fails here; and the
    text tokens at the LLM input are the float16-formed ones, exactly."""
    from parity.jax_impl import api as jax_api

    cfg, ckpt, conv = TINY_VARIANTS["tiny-pg2-gqa"], os.path.join(ROOT, "golden", "tiny-pg2-gqa.b16.npz"), "big_vision"
    x = train_inputs(cfg, seed=1)
    np.savez(tmp_path / "train.npz", **x)
    c = compare_train_step(
        "torch",
        "jax",
        ckpt=ckpt,
        inputs=str(tmp_path / "train.npz"),
        convention=conv,
        options=HALF,
        teacher_forced=True,
    )
    assert c, c.verdict().words
    assert c.to_dict()["train_step"]["frozen_dtype"] == "float16" and c.first_local_divergence is None
    assert any(r.local is not None for r in c.records if r.point == pts.LLM_INPUT)  # the float16 text join
    with open_checkpoint(ckpt) as ck:
        params = {k: np.asarray(v, np.float32) for k, v in ck.load().items()}
    got, step = {}, {}
    for name, api in (("torch", torch_api), ("jax", jax_api)):
        got[name] = api.train_points(api.build_model(cfg, PRESETS[conv], params=params), x, HALF)
        step[name] = api.train_step(api.build_model(cfg, PRESETS[conv], params=params), x, HALF)
    f32 = torch_api.train_step(
        torch_api.build_model(cfg, PRESETS[conv], params=params), x, dataclasses.replace(HALF, frozen_dtype="float32")
    )
    # the text tokens joined at the LLM input: formed in float16 by hand (the lookup in the float16 table, times
    # float16(sqrt(D)), one rounding: a product of two float16 values is exact in float32)
    table = params["llm/embedder/input_embedding"].astype(np.float16)
    text = table[x["text"][:, :-1]] * np.float16(np.sqrt(cfg.text.width))
    for name in got:
        np.testing.assert_array_equal(got[name][pts.LLM_INPUT][:, cfg.num_image_tokens :], text.astype(np.float32))
    for points, other in (("torch", "jax"), ("jax", "torch")):
        loss = step[other].steps[0].loss
        assert abs(float(got[points][pts.TRAIN_LOSS]) - loss) <= 1e-6 * abs(loss), points
        assert abs(f32.steps[0].loss - loss) > 20e-6 * abs(loss)  # the float16 effect, far above the bound
        for key, g in step[other].grads.items():
            assert np.max(np.abs(got[points][pts.grad_leaf(key)] - g)) <= 3e-5 * np.max(np.abs(g)), (points, key)


# -- the CLI -----------------------------------------------------------------------------------------------------------
def test_cli_report_exit_codes_save_rejudge_html(files, tmp_path):
    args = ("compare", CKPT, "--against", files["llm1"], "--train-step", "--inputs", files["train"])
    r = invoke(*args, "--trainable", "llm/layers/attn/*", "--teacher-forced", "--save", tmp_path / "c.json")
    assert r.exit_code == 1, r.output
    assert "first divergence: llm/layer01/mlp" in r.output
    assert "B computes differently: first differing unit llm/layer01" in r.output
    assert re.search(r"FAILED grad/llm/layer01/in: max_rel \S+ <= 0.0001 \(profile fp32 \(training step\)\)", r.output)
    r = invoke("compare", "--rejudge", tmp_path / "c.json", "--json", "--html", tmp_path / "c.html")
    assert r.exit_code == 1
    d = json.loads(r.output)
    assert d["first_local_divergence"] == "llm/layer01/mlp" and d["train_step"]["trainable"] == ["llm/layers/attn/*"]
    page = (tmp_path / "c.html").read_text()
    assert "text tower backward" in page and "text tower (LLM blocks)" in page
    r = invoke("compare", "--rejudge", tmp_path / "c.json", "--policy", _loose(tmp_path), "--json")
    assert r.exit_code == 0 and json.loads(r.output)["passed"]
    r = invoke("compare", CKPT, "--a", "torch", "--b", "torch", "--train-step", "--inputs", files["train"])
    assert r.exit_code == 0 and "every point passes" in r.output


def _loose(tmp_path) -> str:
    p = tmp_path / "loose.toml"
    p.write_text('[[rules]]\npoints = "*"\nmax_rel = 0.5\n[[rules]]\npoints = "logits"\nmax_rel = 0.5\n')
    return str(p)


def one_line(r, *fragments):
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    for f in fragments:
        assert f in lines[0], lines[0]


def test_bad_input(files, tmp_path):
    base = ("compare", CKPT, "--train-step", "--inputs", files["train"])
    capture = tmp_path / "a.safetensors"
    assert invoke("capture", CKPT, "--inputs", files["forward"], "-o", capture).exit_code == 0
    one_line(invoke(*base, "--a", capture, "--b", "torch"), "side A", "capture file", "training step")
    one_line(invoke("compare", CKPT, "--a", "torch", "--b", "jax", "--train-step", "--inputs", files["forward"]),
             "mask_loss", "parity inputs --suffix")  # fmt: skip
    one_line(invoke(*base, "--a", "torch", "--b", "jax", "--trainable", "llm/nope*"), "llm/nope*", "matches no leaf")
    one_line(invoke(*base, "--a", "torch", "--b", "jax", "--steps", "0"), "--steps 0")
    one_line(invoke(*base, "--a", "torch", "--b", "jax", "--lr", "-1"), "--lr -1.0")
    one_line(invoke("compare", CKPT, "--a", "torch", "--b", "jax", "--steps", "2"), "--steps", "--train-step")
    one_line(invoke(*base, "--a", "torch", "--b", "jax", "--truth"), "--truth")
    one_line(invoke(*base, "--a", "torch", "--b", "transformers", "--teacher-forced"), "transformers", "unit_vjps")
    one_line(invoke(*base, "--a", "torch", "--b", "transformers", "--convention", "keras_hub"), "sliding_window")
    one_line(invoke(*base, "--a", "torch", "--b", "jax", "--frozen-dtype", "float16", "--vit-matmul-dtype", "float16"),
             "--vit-matmul-dtype float16", "float32 ViT activations only")  # fmt: skip


def test_sides_training_under_different_conventions_are_refused():
    """The forward conventions are checked as the forward compare does; the training fields too."""
    from parity.compare.train_step import _check_sides
    from parity.errors import ConfigError

    base = {"inputs": {"sha256": "x"}, "config": CFG.to_dict(), "conventions": PRESETS["transformers"].to_dict()}
    other = {**base, "conventions": {**base["conventions"], "loss_normalization": "per_example"}}
    with pytest.raises(ConfigError, match="loss_normalization: per_token vs per_example.*--allow-convention-mismatch"):
        _check_sides(base, other, False)
    _check_sides(base, other, True)
    forward = {**base, "conventions": PRESETS["big_vision"].to_dict()}
    with pytest.raises(ConfigError, match="different conventions"):
        _check_sides(base, forward, False)


def test_backends_implement_the_training_protocols_with_their_signatures():
    import inspect

    from parity import backend

    assert [backend.train_points(n) for n in ("torch", "jax", "transformers")] == [True, True, True]
    assert [backend.teacher_forced_backward(n) for n in ("torch", "jax", "transformers")] == [True, True, False]
    for name in ("torch", "jax", "transformers"):
        for meth in ("train_points", "unit_vjps")[: 1 if name == "transformers" else 2]:
            proto = list(inspect.signature(getattr(backend.BackwardBackend, meth)).parameters)[1:]
            assert list(inspect.signature(getattr(backend.get(name), meth)).parameters) == proto, (name, meth)
