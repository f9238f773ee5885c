"""Golden bundles: every shipped bundle (recorded from transformers, and from keras-hub) checked against both
implementations; a 1e-3 change to one weight fails `check` and names the point; record refuses to overwrite and, with
--update, says what changed; the checkpoint is found relative to the bundle and verified by sha256; the closest
expectation is used."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from parity import golden, points
from parity.cli import main

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(os.path.dirname(HERE), "golden")
BUNDLES = sorted(f for f in os.listdir(GOLDEN) if f.endswith(".bundle"))
KERAS = [b for b in BUNDLES if b.endswith(".keras_hub.bundle")]
PG1 = os.path.join(GOLDEN, "tiny-pg1-mqa.bundle")


def test_the_shipped_bundles_cover_pg1_pg2_window_and_28b_query_scale_recorded_from_transformers():
    from parity.config import TINY_VARIANTS, QueryScale

    configs = {}
    for name in (b for b in BUNDLES if b not in KERAS):
        b = golden.Bundle.open(os.path.join(GOLDEN, name))
        assert {e.impl for e in b.expectations} == {"transformers"}
        assert b.manifest["convention"] == "transformers" and b.manifest["generate"] == 8
        assert not os.path.isabs(b.manifest["checkpoint"]["path"]) and os.path.isfile(b.checkpoint)
        configs[name] = TINY_VARIANTS[b.manifest["config"]]
    texts = [c.text for c in configs.values()]
    assert any(not t.gemma2 for t in texts)
    seq = 16 + 14  # image tokens + text length of golden/tiny-inputs.npz
    assert any(t.gemma2 and t.sliding_window and t.sliding_window < seq for t in texts)
    assert any(t.query_scale == QueryScale.WIDTH_PER_HEAD for t in texts)
    total = sum(
        os.path.getsize(os.path.join(GOLDEN, n, f)) for n in BUNDLES for f in os.listdir(os.path.join(GOLDEN, n))
    )
    assert total < 3 << 20  # a few MB in all


def test_keras_hub_bundles_cover_pg1_and_pg2_with_a_window_shorter_than_the_sequence():
    """Recorded from keras-hub under its convention, on prefix-only inputs (its generation has no suffix), holding
    the points keras-hub exposes; no 28B bundle (keras-hub ignores that query scale)."""
    from parity.config import TINY_VARIANTS
    from parity.conventions import PRESETS
    from parity.inputs import load_inputs

    assert sorted(KERAS) == ["tiny-pg1-mqa.keras_hub.bundle", "tiny-pg2-gqa.keras_hub.bundle"]
    for name in KERAS:
        b = golden.Bundle.open(os.path.join(GOLDEN, name))
        cfg = TINY_VARIANTS[b.manifest["config"]]
        assert {e.impl for e in b.expectations} == {"keras_hub"} and b.manifest["convention"] == "keras_hub"
        # recorded before the training-only options existed: the forward ones, exactly
        assert b.manifest["conventions"] == PRESETS["keras_hub"].forward_dict() and b.manifest["generate"] == 8
        assert not load_inputs(b.inputs, cfg)["mask_ar"].any()
        held = golden.capture_header(b.file(b.expectations[0].capture))[0]
        assert points.LOGITS in held and points.llm_block_out(cfg.text.depth - 1) in held
        assert not any(p.endswith(("/attn", "/mlp")) for p in held)
    assert TINY_VARIANTS["tiny-pg2-gqa"].text.sliding_window < 16 + 14


def test_a_1e3_change_to_one_weight_fails_a_keras_hub_bundle_at_the_first_point_it_holds_after_it(tmp_path):
    """keras-hub exposes block outputs, not the MLP branch: the change shows first at llm/layer01/out."""
    r = golden.check(os.path.join(GOLDEN, "tiny-pg1-mqa.keras_hub.bundle"), checkpoint=_tampered(tmp_path))
    assert not r and r.first_divergence == "llm/layer01/out"
    names = [x.point for x in r.capture.records]
    assert names[names.index("llm/layer01/out") - 1] == "llm/layer00/out"
    assert all(x.passed for x in r.capture.records[: names.index("llm/layer01/out")])


@pytest.mark.parametrize("impl", ["torch", "jax"])
@pytest.mark.parametrize("bundle", BUNDLES)
def test_both_implementations_match_every_shipped_bundle(bundle, impl):
    r = golden.check(os.path.join(GOLDEN, bundle), impl=impl)
    assert r, r.first_divergence
    assert r.checkpoint["sha256_verified"]
    compared = [x for x in r.capture.records if x.stats is not None]
    held = golden.capture_header(golden.Bundle.open(os.path.join(GOLDEN, bundle)).file(r.expectation.capture))[0]
    # every point the bundle's file holds (all of them from transformers), in forward order
    assert [x.point for x in compared] == [p for p in points.forward_points(_cfg(bundle)) if p in held]
    if bundle not in KERAS:
        assert len(compared) == len(points.forward_points(_cfg(bundle)))
    assert all(row.first_divergence is None for row in r.generation.rows)
    assert any(x.point.endswith("k_cache") and x.stats.compared > 0 for x in r.generation.records)


def _cfg(bundle):
    from parity.config import TINY_VARIANTS

    return TINY_VARIANTS[golden.Bundle.open(os.path.join(GOLDEN, bundle)).manifest["config"]]


def _tampered(tmp_path, key="params/llm/layers/mlp/linear", index=(1, 5, 7), delta=1e-3):
    with np.load(os.path.join(GOLDEN, "tiny-pg1-mqa.npz"), allow_pickle=False) as z:
        params = {k: z[k] for k in z.files}
    params[key] = params[key].copy()
    params[key][index] += delta
    path = str(tmp_path / "tampered.npz")
    np.savez(path, **params)
    return path


def test_a_1e3_change_to_one_weight_fails_check_and_names_the_point(tmp_path):
    """Layer 1's MLP output projection, one element + 1e-3: the first failing point is that block's MLP branch."""
    ckpt = _tampered(tmp_path)
    res = CliRunner().invoke(main, ["golden", "check", PG1, "--checkpoint", ckpt, "--json"])
    assert res.exit_code == 1, res.output
    d = json.loads(res.output)
    assert d["schema"] == "parity.golden.check/1" and not d["passed"]
    assert d["first_divergence"] == d["capture"]["first_divergence"] == "llm/layer01/mlp"
    names = [p["point"] for p in d["capture"]["points"]]  # forward order
    before = d["capture"]["points"][: names.index("llm/layer01/mlp")]
    assert len(before) > 10 and all(p["judgement"]["passed"] for p in before)
    assert d["checkpoint"]["sha256_verified"] is False
    text = CliRunner().invoke(main, ["golden", "check", PG1, "--checkpoint", ckpt])
    assert text.exit_code == 1 and "llm/layer01/mlp" in text.output


def test_the_checkpoint_is_found_relative_to_the_bundle_and_verified_by_sha256(tmp_path):
    clone = tmp_path / "clone" / "golden"  # a fresh clone in another folder
    shutil.copytree(PG1, clone / "tiny-pg1-mqa.bundle")
    shutil.copy(os.path.join(GOLDEN, "tiny-pg1-mqa.npz"), clone / "tiny-pg1-mqa.npz")
    r = golden.check(str(clone / "tiny-pg1-mqa.bundle"))
    assert r and r.checkpoint["path"] == str(clone / "tiny-pg1-mqa.npz")
    shutil.copy(_tampered(tmp_path), clone / "tiny-pg1-mqa.npz")
    res = CliRunner().invoke(main, ["golden", "check", str(clone / "tiny-pg1-mqa.bundle")])
    assert res.exit_code == 2 and "sha256" in res.output and "tiny-pg1-mqa.npz" in res.output
    os.remove(clone / "tiny-pg1-mqa.npz")
    res = CliRunner().invoke(main, ["golden", "check", str(clone / "tiny-pg1-mqa.bundle")])
    assert res.exit_code == 2 and "missing" in res.output


def test_record_refuses_to_overwrite_and_update_reports_what_changed(tmp_path):
    ckpt, inputs = os.path.join(GOLDEN, "tiny-pg1-mqa.npz"), os.path.join(GOLDEN, "tiny-inputs.npz")
    out = str(tmp_path / "t.bundle")
    args = ["golden", "record", ckpt, "--inputs", inputs, "--impl", "torch", "--generate", "3", "-o", out]
    assert CliRunner().invoke(main, args).exit_code == 0
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "--update" in res.output
    b = golden.Bundle.open(out)
    assert b.manifest["convention"] == "big_vision" and [e.key for e in b.expectations] == [("cpu", "fp32")]
    tampered = str(tmp_path / "tiny-pg1-mqa.npz")
    shutil.copy(_tampered(tmp_path), tampered)
    res = CliRunner().invoke(
        main, ["golden", "record", tampered, "--inputs", inputs, "--generate", "3", "-o", out, "--update", "--json"]
    )
    assert res.exit_code == 0, res.output
    ch = json.loads(res.output)["changes"]
    changed = [p["point"] for p in ch["points_changed"]]
    assert changed[0] == "llm/layer01/mlp" and "img/patch_embed" not in changed  # before it: bit-identical
    assert any(d["key"] == "checkpoint.sha256" for d in ch["manifest"])
    assert golden.Bundle.open(out).manifest["checkpoint"]["path"] == "../tiny-pg1-mqa.npz"
    text = CliRunner().invoke(main, ["golden", "record", tampered, "--inputs", inputs, "-o", out, "--update"])
    assert text.exit_code == 0 and "unchanged" in text.output


def test_the_closest_expectation_is_used_when_the_exact_one_is_missing():
    exps = [
        dict(device_class="cpu", profile="fp32", capture="a", generation=None, impl="torch", recorded=""),
        dict(device_class="cuda", profile="bf16", capture="b", generation=None, impl="torch", recorded=""),
    ]
    b = golden.Bundle("/x", {"expectations": exps})
    assert b.closest("cpu", "fp32") == (golden.Expectation(**exps[0]), None)
    e, note = b.closest("cuda", "tf32")
    assert e.capture == "b" and "closest" in note and "cuda/tf32" in note
    assert b.closest("tpu", "fp32")[0].capture == "a"
    assert b.closest("cpu", "bf16")[0].capture == "a"  # same device class before the same profile
    assert golden.device_class("cuda:0 (NVIDIA H200)") == "cuda" == golden.device_class("gpu:0")
    assert golden.device_class("cpu (x86_64)") == "cpu" and golden.device_class("tpu:0") == "tpu"


def test_a_bfloat16_check_falls_back_to_the_fp32_expectation_under_the_bf16_profile():
    r = golden.check(PG1, dtype="bfloat16")
    assert r.notes == ("no expectation for cpu/bf16 in this bundle; using the closest, cpu/fp32",)
    assert r.capture.tolerances.profile == "bf16" and r.generation.tolerances.profile == "bf16"
    assert r.expectation.key == ("cpu", "fp32")
    assert max(x.stats.max_rel for x in r.capture.records if x.stats) > 1e-4  # really ran in bfloat16


def test_a_transformers_bundle_short_of_one_point_is_refused_naming_the_file_and_the_point(tmp_path):
    """Only keras-hub expectations may hold a subset of the points; a torch / jax / transformers capture that lost
    one (an edited or damaged bundle) is exit 2 naming the file and the point, not a pass on the points left."""
    from converters import safetensors_io
    from parity.run import CAPTURE_DTYPES

    bundle = tmp_path / "tiny-pg1-mqa.bundle"
    shutil.copytree(PG1, bundle)
    shutil.copy(os.path.join(GOLDEN, "tiny-pg1-mqa.npz"), tmp_path / "tiny-pg1-mqa.npz")
    cap = str(bundle / golden.Bundle.open(str(bundle)).expectations[0].capture)
    with safetensors_io.SafetensorsReader.open(cap, allowed=CAPTURE_DTYPES) as r:
        tensors = {k: r.read(k) for k in r.keys() if k != "llm/layer01/mlp"}
        meta = dict(r.metadata)
    os.remove(cap)
    with open(cap, "wb") as f:
        safetensors_io.write_file(
            f, [(k, v.dtype, v.shape) for k, v in tensors.items()], [[v] for v in tensors.values()], meta
        )
    res = CliRunner().invoke(main, ["golden", "check", str(bundle)])
    assert res.exit_code == 2, res.output
    assert "llm/layer01/mlp" in res.output and "cpu-fp32.capture.safetensors" in res.output
