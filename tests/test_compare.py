"""parity compare end to end with PyTorch sides (float32 vs bfloat16, planted changes, capture files) and the
transformers side; the CLI's exit statuses, JSON schema, --save / --rejudge and policies."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from torch_fixtures import make_inputs

from parity import points, spec
from parity.cli import main
from parity.compare import compare, compare_captures, rejudge, save
from parity.compare import tolerances as tol
from parity.compare.core import MISSING_B, judge
from parity.compare.sides import write_capture
from parity.config import TINY_VARIANTS
from parity.errors import ConfigError, InputsError
from parity.inputs import save_inputs
from parity.run import capture, read_capture

GQA = TINY_VARIANTS["tiny-pg2-gqa"]


def write_ckpt(path, params):
    np.savez(path, **{spec.NPZ_PREFIX + k: v for k, v in params.items()})
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Per tiny config: (checkpoint, inputs) in a module-wide directory."""
    d = tmp_path_factory.mktemp("compare")
    out = {}
    for name, cfg in TINY_VARIANTS.items():
        ck = write_ckpt(d / f"{name}.npz", spec.random_params(cfg, seed=3))
        inp = str(save_inputs(d / f"{name}.inputs.npz", make_inputs(cfg)))
        out[name] = (ck, inp)
    out["dir"] = d
    return out


@pytest.mark.parametrize("name", list(TINY_VARIANTS))
def test_float32_vs_bfloat16_fails_fp32_and_passes_bf16(files, name):
    ck, inp = files[name]
    c = compare("torch", "torch:bfloat16", ckpt=ck, inputs=inp, layer_by_layer=True, isolate=False)
    assert c.tolerances.profile == "bf16" and c and c.first_divergence is None  # chosen from the manifests
    assert len(c.records) == len(points.forward_points(TINY_VARIANTS[name]))
    assert [d["key"] for d in c.differences] == ["compute_dtype", "dtype"]
    strict = judge(c, tol.tolerances("fp32", None, {}, {}))
    assert not strict and strict.exit_code == 1 and strict.first_divergence == points.IMG_PATCH_EMBED
    logits = c.records[-1].stats
    assert logits.kl_max is not None and 0.5 < logits.top1 <= 1.0 and c.ulp_dtype == "bfloat16"


@pytest.mark.parametrize("name", ["tiny-pg1-mqa", "tiny-pg2-gqa"])
def test_torch_vs_transformers_passes_fp32(files, name):
    ck, inp = files[name]
    c = compare("transformers", "torch", ckpt=ck, inputs=inp, layer_by_layer=True, isolate=False)
    assert c.tolerances.profile == "fp32" and c, [str(r.judgement) for r in c.records if not r.passed]
    assert c.sides["A"]["manifest"]["conventions"]["position_origin"] == 1  # the transformers convention
    assert any("padding rows" in n and "argmax in the padding rows at 0 of" in n for n in c.notes), c.notes
    with pytest.raises(ConfigError, match="convention"):
        compare("transformers", "torch", ckpt=ck, inputs=inp, convention="big_vision", isolate=False)


def planted(files, key, block, tag):
    """CKPT_B: CKPT with `key`'s block `block` scaled by 1.01 (one side only)."""
    ck, inp = files["tiny-pg2-gqa"]
    params = spec.random_params(GQA, seed=3)
    for k in key:
        params[k][block] *= np.float32(1.01)
    return ck, write_ckpt(files["dir"] / f"planted-{tag}.npz", params), inp


def assert_singled_out(c, first, block_points, block):
    """Exit 1; `first` is the first divergence in both modes; local error passes everywhere but that block (the
    units between the blocks, run on A's inputs, pass too); propagated error is exactly zero before it and fails
    from there on."""
    assert not c and c.exit_code == 1
    assert c.first_divergence == first and c.first_local_divergence == first
    tower = first.split("/")[0]
    for r in c.records:
        if r.point in points.graph_units(GQA):
            assert r.local is not None and r.local_judgement, (r.point, str(r.local_judgement))
            continue
        if r.local is None or not r.point.startswith(tower):
            continue
        i = int(r.point.split("/")[1][-2:])
        if r.point in block_points(block):
            assert not r.local_judgement
        else:
            assert r.local_judgement, str(r.local_judgement)
        if i < block:
            assert r.stats.max_abs == 0.0
    tower = c.amplification()[tower]
    after = [row for row in tower if row["block"] >= block]
    assert after and all(not row["passed"] for row in after)
    assert all(row["max_rel"] == 0.0 for row in tower if row["block"] < block)


def test_planted_llm_mlp_change_is_singled_out_cli(files):
    """Through the CLI, each side in its own process: --against, --teacher-forced, --json."""
    ck, ck_b, inp = planted(files, ["llm/layers/mlp/gating_einsum", "llm/layers/mlp/linear"], 1, "llm")
    r = CliRunner().invoke(
        main, ["compare", ck, "--against", ck_b, "--inputs", inp, "--layer-by-layer", "--teacher-forced", "--json"]
    )
    assert r.exit_code == 1, r.output
    d = json.loads(r.output)
    assert d["schema"] == "parity.compare/1" and d["first_divergence"] == points.llm_block_mlp(1)
    assert d["first_local_divergence"] == points.llm_block_mlp(1) and d["profile"] == "fp32"
    assert {x["key"] for x in d["manifest_differences"]} == {"checkpoint.path", "checkpoint.sha256"}
    by = {p["point"]: p for p in d["points"]}
    assert by[points.llm_block_attn(1)]["judgement"]["passed"]  # the attention branch before the change is exact
    assert by[points.llm_block_mlp(1)]["local"]["judgement"]["passed"] is False
    assert by[points.llm_block_mlp(2)]["local"]["judgement"]["passed"] is True
    assert by[points.LOGITS]["judgement"]["passed"] is False
    for rec in d["points"]:
        assert set(rec) == {"point", "status", "stats", "judgement", "local"}
    assert [row["block"] for row in d["amplification"]["llm"]] == [0, 1, 2]


def test_planted_llm_mlp_change_is_singled_out(files):
    ck, ck_b, inp = planted(files, ["llm/layers/mlp/gating_einsum", "llm/layers/mlp/linear"], 1, "llm")
    c = compare(ckpt=ck, against=ck_b, inputs=inp, layer_by_layer=True, teacher_forced=True, isolate=False)
    assert_singled_out(c, points.llm_block_mlp(1), lambda i: {points.llm_block_mlp(i), points.llm_block_out(i)}, 1)
    plain = compare(ckpt=ck, against=ck_b, inputs=inp, layer_by_layer=True, isolate=False)  # propagated only
    assert plain.first_divergence == points.llm_block_mlp(1) and plain.first_local_divergence is None


def test_planted_vit_mlp_change_is_singled_out(files):
    ck, ck_b, inp = planted(
        files,
        [
            "img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel",
            "img/Transformer/encoderblock/MlpBlock_0/Dense_1/kernel",
        ],
        1,
        "vit",
    )
    c = compare(ckpt=ck, against=ck_b, inputs=inp, layer_by_layer=True, teacher_forced=True, isolate=False)
    assert_singled_out(c, points.img_block_out(1), lambda i: {points.img_block_out(i)}, 1)


def test_capture_files_compare_and_mismatched_inputs_are_refused(files, tmp_path):
    ck, inp = files["tiny-pg2-gqa"]
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    capture(ck, inp, a)
    m = capture(ck, inp, b, dtype="bfloat16", points="llm/*")
    c = compare(a, b)  # the manifests' inputs file locates the padding positions
    assert c.tolerances.profile == "bf16" and "inputs file not available" not in c.valid_positions
    assert {r.point for r in c.records if r.status == MISSING_B} == {
        p for p in points.forward_points(GQA) if p.startswith("img/")
    }
    assert c, [str(r.judgement) for r in c.records if not r.passed]
    # B as recorded on another machine: another device, precision and library version in its manifest.
    tensors, mb = read_capture(b)
    mb.update(device="cuda:0 (NVIDIA H200)", precision="high")
    mb["libraries"]["torch"] = "9.9"
    g = str(tmp_path / "gpu.safetensors")
    write_capture(g, tensors, mb)
    c = compare(a, g)
    assert {d["key"] for d in c.differences} == {"device", "precision", "libraries.torch", "dtype", "compute_dtype"}
    assert c.tolerances.profile == "bf16" and c
    other = str(save_inputs(tmp_path / "other.npz", make_inputs(GQA, seed=5)))
    o = str(tmp_path / "o.safetensors")
    capture(ck, other, o)
    runner = CliRunner()
    r = runner.invoke(main, ["compare", "--a", a, "--b", o])
    assert r.exit_code == 2 and "different inputs" in r.output and m["inputs"]["sha256"] in r.output
    os.rename(inp, inp + ".moved")
    try:
        c = compare(a, b)
        assert "inputs file not available" in c.valid_positions
    finally:
        os.rename(inp + ".moved", inp)
    r = runner.invoke(main, ["compare", "--a", a, "--b", str(tmp_path / "nope.safetensors")])
    assert r.exit_code == 2 and "nope.safetensors" in r.output and "not found" in r.output


def test_convention_mismatch_is_refused_unless_allowed(files, tmp_path):
    ck, inp = files["tiny-pg2-gqa"]
    a, b = str(tmp_path / "bv.safetensors"), str(tmp_path / "hf.safetensors")
    capture(ck, inp, a, convention="big_vision")
    capture(ck, inp, b, convention="transformers")
    with pytest.raises(ConfigError, match="position_origin: 0 vs 1"):
        compare_captures(a, b)
    c = compare_captures(a, b, allow_convention_mismatch=True)
    assert "conventions.position_origin" in {d["key"] for d in c.differences}
    # The sliding window of local layer 0 (window 8 < the sequence) is the first place the conventions part.
    assert not c and c.first_divergence == points.llm_block_attn(0)


def test_save_rejudge_and_policy(files, tmp_path):
    ck, inp = files["tiny-pg2-gqa"]
    saved = str(tmp_path / "r.json")
    save(compare("torch", "torch:bfloat16", ckpt=ck, inputs=inp, layer_by_layer=True, isolate=False), saved)
    assert rejudge(saved) and not rejudge(saved, profile="fp32")
    policy = tmp_path / "loose.toml"
    policy.write_text('[[rules]]\npoints = "*"\ncosine = 0.99\n')
    assert rejudge(saved, profile="fp32", policy=str(policy))
    policy.write_text('[[rules]]\npoints = "logits"\ntop1 = 1.0\n')
    strict = rejudge(saved, policy=str(policy))
    assert strict.first_divergence == (None if strict.records[-1].stats.top1 == 1.0 else points.LOGITS)
    runner = CliRunner()
    r = runner.invoke(main, ["compare", "--rejudge", saved, "--profile", "fp32", "--json"])
    assert r.exit_code == 1 and json.loads(r.output)["first_divergence"] == points.IMG_PATCH_EMBED
    r = runner.invoke(main, ["compare", "--rejudge", saved])
    assert r.exit_code == 0 and "every point passes" in r.output and "first divergence: none" in r.output
    (tmp_path / "bad.json").write_text("{}")
    r = runner.invoke(main, ["compare", "--rejudge", str(tmp_path / "bad.json")])
    assert r.exit_code == 2 and "schema" in r.output


def test_usage_errors_exit_2(files):
    ck, inp = files["tiny-pg2-gqa"]
    runner = CliRunner()
    for args, needle in [
        (["--a", "torch", "--b", "nosuch"], "unknown implementation 'nosuch'"),
        (["--a", "torch"], "give both sides"),
        (["--a", "torch", "--b", __file__, "--teacher-forced", "--inputs", inp], "not a capture file"),
        ([ck, "--a", "torch", "--b", "torch:bfloat16"], "--inputs is required"),
        (["--a", "torch", "--b", "transformers", "--teacher-forced", "--inputs", inp], "has no vit_block"),
    ]:
        r = runner.invoke(main, ["compare", *([] if args[0] != "--a" else [ck]), *args])
        assert r.exit_code == 2 and needle in r.output, (args, r.output)
    with pytest.raises(InputsError, match="not a capture file|capture file"):
        compare(__file__, __file__)
