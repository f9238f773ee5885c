"""Teacher forcing covers the whole graph: besides the blocks, the units between and after them (points.graph_units:
the ViT's final norm, the projector, the image/text concatenation with the embedding scale, the final norm, the head)
run on side A's captured input. A change planted in one of them fails teacher-forced at that unit and nowhere else;
a correct torch-vs-jax compare on every tiny config says the whole graph is covered; a backend that runs only blocks
leaves the units between them uncovered, and the verdict names them."""

from __future__ import annotations

import inspect
import types

import numpy as np
import pytest
from torch_fixtures import make_inputs

pytest.importorskip("jax")

from test_compare import write_ckpt

from parity import backend, spec
from parity import points as pts
from parity.capture_file import write_capture
from parity.compare import compare, compare_captures
from parity.config import TINY_VARIANTS
from parity.conventions import PRESETS
from parity.inputs import save_inputs
from parity.jax_impl import api as jax_api
from parity.pipeline import teacher_forced_blocks
from parity.run import capture, read_capture
from parity.torch_impl import api as torch_api
from parity.torch_impl.decoder import Embedder

GQA = TINY_VARIANTS["tiny-pg2-gqa"]
WHOLE = (
    "the whole graph (stem, {v} ViT + {t} LLM blocks, ViT final norm, projector, "
    "image/text concatenation + embedding scale, final norm, head)"
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("units")
    out = {"dir": d}
    for name, cfg in TINY_VARIANTS.items():
        out[name] = (
            write_ckpt(d / f"{name}.npz", spec.random_params(cfg, seed=5)),
            str(save_inputs(d / f"{name}.inputs.npz", make_inputs(cfg, seed=2))),
        )
    return out


def local_failures(c) -> list[str]:
    return [r.point for r in c.records if r.local_judgement is not None and not r.local_judgement]


@pytest.mark.parametrize("name", list(TINY_VARIANTS))
def test_correct_torch_vs_jax_covers_the_whole_graph(files, name):
    cfg = TINY_VARIANTS[name]
    ck, inp = files[name]
    c = compare("torch", "jax", ckpt=ck, inputs=inp, teacher_forced=True, isolate=False)
    v = c.verdict()
    assert c and v.basis == "local" and v.passed and not v.not_covered, v.words
    assert v.covered == WHOLE.format(v=cfg.vision.depth, t=cfg.text.depth)
    assert v.units == cfg.vision.depth + cfg.text.depth + len(pts.graph_units(cfg))
    assert v.words.startswith("same function: every unit passes teacher-forced") and v.words.endswith(v.covered)
    by = {r.point: r for r in c.records}
    for unit in pts.graph_units(cfg):  # each unit of one framework on the other's input: rounding apart
        assert by[unit].local_judgement and by[unit].local.max_rel < 1e-5, (unit, by[unit].local.max_rel)


def planted(files, tag: str, edit) -> tuple[str, str, str]:
    """CKPT_B: the gqa checkpoint with `edit(params)` applied (one side only)."""
    ck, inp = files["tiny-pg2-gqa"]
    params = spec.random_params(GQA, seed=5)
    edit(params)
    return ck, write_ckpt(files["dir"] / f"planted-{tag}.npz", params), inp


def assert_only_unit_fails(c, unit: str, label: str) -> None:
    """Exit 1 naming `unit` (label in words); every other unit, blocks included, passes locally; the stem and
    every point before the unit pass propagated too (two frameworks: rounding apart)."""
    v = c.verdict()
    assert not c and c.exit_code == 1 and v.basis == "local" and not v.not_covered
    assert v.first_differing_unit == unit and c.first_local_divergence == unit
    assert local_failures(c) == [unit]
    assert v.words.startswith(f"B computes differently: first differing unit {label} (teacher-forced error at {unit}")
    order = pts.forward_points(GQA)
    for r in c.records[: order.index(unit)]:
        assert r.judgement and r.stats.max_rel < 1e-5, r.point


def test_a_projector_change_fails_at_the_projector_only(files):
    def edit(params):
        params["img/head/kernel"][3, 5] *= np.float32(1.01)  # one weight

    ck, ck_b, inp = planted(files, "projector", edit)
    c = compare("torch", "jax", ckpt=ck, against=ck_b, inputs=inp, teacher_forced=True, isolate=False)
    assert_only_unit_fails(c, pts.PROJECTOR, "projector")
    assert c.first_divergence == pts.PROJECTOR  # propagated, it fails everywhere after


def test_a_final_norm_change_fails_at_the_final_norm_only(files):
    def edit(params):
        params["llm/final_norm/scale"][7] += np.float32(0.01)  # one element of (1 + scale)

    ck, ck_b, inp = planted(files, "final-norm", edit)
    c = compare("jax", "torch", ckpt=ck, against=ck_b, inputs=inp, teacher_forced=True, isolate=False)
    assert_only_unit_fails(c, pts.LLM_FINAL_NORM, "final norm")
    assert c.first_divergence == pts.LLM_FINAL_NORM


def test_a_wrong_embedding_scale_fails_at_the_concatenation_only(files, monkeypatch):
    """The text embeddings scaled by 1.01 sqrt(D) on side B (torch) only: code, not weights, so it is planted in
    the torch Embedder; the head (the same table, decoded) is not touched and passes."""
    encode = Embedder.encode
    monkeypatch.setattr(Embedder, "encode", lambda self, tokens, dtype: encode(self, tokens, dtype) * 1.01)
    ck, inp = files["tiny-pg2-gqa"]
    c = compare("jax", "torch", ckpt=ck, inputs=inp, teacher_forced=True, isolate=False)
    assert_only_unit_fails(c, pts.LLM_INPUT, "image/text concatenation + embedding scale")
    by = {r.point: r for r in c.records}
    assert not by[pts.LLM_INPUT].judgement and by[pts.LLM_INPUT].local.max_rel > 1e-3


def test_a_backend_with_blocks_only_leaves_the_units_between_uncovered(files, tmp_path):
    """A BlockBackend that is not a UnitBackend (as an outside port may be): its teacher-forced run holds the block
    points only, and a comparison built on it names every uncovered unit."""

    members = [*backend._METHODS, "name", "build_options", "vit_block", "llm_block"]
    be = types.SimpleNamespace(**{m: getattr(torch_api, m) for m in members})
    assert isinstance(be, backend.BlockBackend) and not isinstance(be, backend.UnitBackend)
    ck, inp = files["tiny-pg2-gqa"]
    ref = str(tmp_path / "a.safetensors")
    capture(ck, inp, ref, impl="torch")
    model = torch_api.build_model(GQA, PRESETS["big_vision"], params=spec.random_params(GQA, seed=5))
    got = teacher_forced_blocks(be, model, GQA, make_inputs(GQA, seed=2), ref)
    assert not set(got) & set(pts.graph_units(GQA))
    assert len(got) == 2 * GQA.vision.depth + 3 * GQA.text.depth
    arrays, manifest = read_capture(ref)
    teacher = str(tmp_path / "b.teacher.safetensors")
    write_capture(teacher, got, {**manifest, "points": list(got), "teacher_forced_from": ref})
    c = compare_captures(ref, ref, teacher, inputs=inp)
    v = c.verdict()
    assert c and v.basis == "local" and v.covered == "2 ViT + 3 LLM blocks, stem"
    assert v.not_covered == (
        "ViT final norm",
        "projector",
        "image/text concatenation + embedding scale",
        "final norm",
        "head",
    )
    assert v.words.endswith(f"not covered: {', '.join(v.not_covered)}")
    full = teacher_forced_blocks(torch_api, model, GQA, make_inputs(GQA, seed=2), ref)
    assert list(full) == [p for p in pts.forward_points(GQA) if p in full]  # forward order
    assert set(full) == set(got) | set(pts.graph_units(GQA))


def test_unit_arguments_are_checked_alike_and_the_protocol_matches():
    """Both frameworks refuse an unknown unit and a wrong input shape with the same one line; the protocol's unit
    takes the parameters each implementation's takes."""
    inputs = make_inputs(GQA)
    t = GQA.num_image_tokens
    bad = [
        ("img/block00/out", np.zeros((2, t, GQA.vision.width), np.float32)),
        (pts.PROJECTOR, np.zeros((2, t, GQA.text.width), np.float32)),  # the projector takes the ViT width
        (pts.LLM_INPUT, np.zeros((2, t + 1, GQA.text.width), np.float32)),  # T image tokens
    ]
    messages = {}
    for api in (torch_api, jax_api):
        m = api.build_model(GQA, PRESETS["big_vision"])
        got = []
        for point, x in bad:
            with pytest.raises(ValueError) as e:
                api.unit(m, point, x, inputs)
            got.append(str(e.value))
        messages[api.name] = got
        proto = list(inspect.signature(backend.UnitBackend.unit).parameters)[1:]
        assert proto == list(inspect.signature(api.unit).parameters)
    assert messages["torch"] == messages["jax"]
    assert messages["torch"][0].startswith("unit 'img/block00/out': the units between the blocks are img/encoder_norm")
    assert "expected float[B, 16, 32]" in messages["torch"][1]


def test_a_unit_runs_under_the_models_precision_and_leaves_the_process_as_found(monkeypatch):
    import jax
    import torch

    params = spec.random_params(GQA, seed=5)
    x = np.zeros((2, GQA.num_image_tokens, GQA.vision.width), np.float32)
    inputs = make_inputs(GQA)
    m = torch_api.build_model(GQA, PRESETS["big_vision"], params=params, precision="high")
    seen = []
    m.img.head.register_forward_pre_hook(lambda *_: seen.append(torch.get_float32_matmul_precision()))
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        torch_api.unit(m, pts.PROJECTOR, x, inputs)
        assert seen == ["high"] and torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)
    mj = jax_api.build_model(GQA, PRESETS["big_vision"], params=params, precision="high")
    original, seen = jax_api._unit, []
    monkeypatch.setattr(
        jax_api, "_unit", lambda *a: seen.append(jax.config.jax_default_matmul_precision) or original(*a)
    )
    with jax.default_matmul_precision("bfloat16"):
        jax_api.unit(mj, pts.PROJECTOR, x, inputs)
        assert seen == ["high"] and jax.config.jax_default_matmul_precision == "bfloat16"


def test_a_partial_capture_names_what_it_leaves_uncovered():
    """Points selected with --points: a unit whose input was not captured has no local error and is named as not
    covered (not taken for the stem); the units that ran are covered by name."""
    from test_compare_verdict import LLM, _stats

    from parity.compare import tolerances as tol
    from parity.compare.core import COMPARED, Comparison, PointRecord, judge

    order = ["img/projector", "llm/input_embeddings", *LLM, "llm/final_norm", "logits"]
    records = tuple(
        PointRecord(p, COMPARED, _stats(1e-7), local=None if p == "img/projector" else _stats(1e-8)) for p in order
    )
    fp32 = tol.tolerances("fp32", None, {}, {})
    v = judge(Comparison({}, [], fp32, records, "float32", True, "all positions"), fp32).verdict()
    assert v.passed and v.basis == "local" and v.not_covered == ("projector",)
    assert v.covered == "0 ViT + 2 LLM blocks, image/text concatenation + embedding scale, final norm, head"
    assert v.units == 2 + 3 and v.words.endswith(f"local: {v.covered}; not covered: projector")
