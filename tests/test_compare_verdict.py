"""The verdict (parity.compare.verdict): a port is judged on its units' local (teacher-forced) errors when they
exist, on propagated errors otherwise or when a policy requires it; ULP of the point's scale; one-hot softmaxes'
KL labelled. Records are built by hand (max_rel values chosen against the fp32 profile's bounds), then one
end-to-end teacher-forced compare of torch against jax."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from torch_fixtures import make_inputs

from parity import spec
from parity.compare import compare
from parity.compare import tolerances as tol
from parity.compare.core import COMPARED, Comparison, PointRecord, judge
from parity.compare.report import kl_words, render
from parity.compare.stats import PointStats, point_stats, scale_ulp
from parity.config import TINY_VARIANTS
from parity.inputs import save_inputs

# forward order of a model with 2 ViT and 2 LLM blocks; the blocks' points have local (teacher-forced) errors
STEM = ["img/patch_embed", "img/with_posemb"]
VIT = [f"img/block0{i}/{p}" for i in range(2) for p in ("attn", "out")]
MID = ["img/encoder_norm", "img/projector", "llm/input_embeddings"]
LLM = [f"llm/layer0{i}/{p}" for i in range(2) for p in ("attn", "mlp", "out")]
TAIL = ["llm/final_norm", "logits"]
ORDER = STEM + VIT + MID + LLM + TAIL


def _stats(max_rel: float) -> PointStats:
    return PointStats((4,), 4, max_rel, max_rel, max_rel, max_rel, 1.0, 60.0, 1, "float32", (0,), 1.0, 1.0)


def comparison(propagated: dict[str, float], local: dict[str, float], policy=None, tf=True) -> Comparison:
    """Every point at 1e-7 propagated (1e-8 local) unless given; judged under fp32 (and `policy`)."""
    records = tuple(
        PointRecord(
            p,
            COMPARED,
            _stats(propagated.get(p, 1e-7)),
            local=_stats(local.get(p, 1e-8)) if tf and p.startswith(("img/block", "llm/layer")) else None,
        )
        for p in ORDER
    )
    c = Comparison({}, [], tol.tolerances("fp32", None, {}, {}), records, "float32", tf, "all positions")
    return judge(c, tol.tolerances("fp32", policy, {}, {}))


def drifting() -> dict[str, float]:
    """Propagated error that grows block by block past the fp32 bounds (1e-4 residual, 2e-4 branches)."""
    return {
        "img/block00/out": 1e-6,
        "img/block01/out": 2e-5,  # x20 over block 0: the most amplifying unit
        "llm/input_embeddings": 2e-5,
        "llm/layer00/out": 4e-5,
        "llm/layer01/attn": 3e-4,
        "llm/layer01/mlp": 3e-4,
        "llm/layer01/out": 3e-4,
        "llm/final_norm": 5e-4,
        "logits": 8e-4,
    }


def test_amplified_rounding_passes_on_local_errors_and_is_named_in_words():
    c = comparison(drifting(), {"llm/layer01/mlp": 4e-6})
    v = c.verdict()
    assert c and c.exit_code == 0 and v.basis == "local" and v.passed
    assert c.first_divergence == "llm/layer01/attn"  # the propagated first divergence is still reported
    assert v.drift == 8e-4 and v.drift_point == "logits" and v.units == 4
    assert v.amplification == pytest.approx(8e-4 / 4e-6)  # drift over the largest local error
    assert v.most_amplifying_unit == "img/block01" and v.most_amplifying_ratio == pytest.approx(20.0)
    assert "outputs drift by 8.0e-04" in v.words and "after 4 units through amplified rounding (×200.0" in v.words
    assert "most amplifying unit img/block01" in v.words and "local: 2 ViT + 2 LLM blocks, stem" in v.words
    assert v.not_covered == (
        "ViT final norm",
        "projector",
        "image/text concatenation + embedding scale",
        "final norm",
        "head",
    )
    d = json.loads(json.dumps(c.to_dict()))
    assert d["passed"] is True and d["first_divergence"] == "llm/layer01/attn"
    assert {"basis", "words", "drift", "amplification", "most_amplifying_unit"} <= set(d["verdict"])


def test_one_unit_out_of_tolerance_fails_naming_the_first_differing_unit():
    c = comparison(drifting(), {"llm/layer01/mlp": 5e-4, "llm/layer01/out": 2e-4})
    v = c.verdict()
    assert not c and c.exit_code == 1 and v.basis == "local" and v.first_differing_unit == "llm/layer01"
    assert v.words.startswith("B computes differently: first differing unit llm/layer01")
    assert "llm/layer01/mlp" in v.words and "max_rel 2e-04" in v.words


def test_a_stem_difference_fails_although_every_block_passes():
    """The stem has nothing upstream: its propagated error is its local error, and it is judged."""
    c = comparison({"img/patch_embed": 1e-3}, {})
    v = c.verdict()
    assert not c and v.basis == "local" and v.first_differing_unit == "stem (img/patch_embed)"


def test_policy_can_require_propagated_agreement(tmp_path):
    policy = tmp_path / "strict.toml"
    policy.write_text('require_propagated = true\n[[rules]]\npoints = "nothing"\nmax_rel = 1\n')
    c = comparison(drifting(), {}, policy=str(policy))
    v = c.verdict()
    assert not c and v.basis == "propagated" and "policy requires propagated agreement" in v.words
    assert c.to_dict()["tolerances"]["require_propagated"] is True
    policy.write_text("require_propagated = 1\n")
    with pytest.raises(Exception, match="require_propagated"):
        tol.load_policy(str(policy))


def test_propagated_failure_without_teacher_forcing_suggests_it():
    c = comparison(drifting(), {}, tf=False)
    v = c.verdict()
    assert not c and v.basis == "propagated" and v.hint and "--teacher-forced" in v.hint
    assert v.words.startswith("mismatch: 5 of 17 points fail; first divergence llm/layer01/attn")
    assert comparison({}, {}, tf=False).verdict().hint is None


def test_terminal_report_ends_with_the_verdict(capsys):
    from rich.console import Console

    c = comparison(drifting(), {})
    sides = {k: {"spec": "torch", "manifest": {"impl": "torch"}} for k in "AB"}
    c = Comparison(sides, [], c.tolerances, c.records, "float32", True, "all positions")
    render(c, Console(width=2000))
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1].startswith("same function: every unit passes teacher-forced")


def test_ulp_of_the_scale_by_hand():
    a = np.array([1000.0, 1e-30], np.float32)
    b = a.copy()
    b[0] = a[0] + np.float32(3 * 2.0**-14)  # the float32 spacing in [512, 1024) is 2^(9 - 23)
    b[1] = np.float32(2e-30)  # far in per-element ULPs, nothing at the point's scale
    s = point_stats(a, b)
    assert s.scale_ulp == pytest.approx(3.0) and s.ulp > 1e6
    assert scale_ulp(2.0**-7, 1.5, "bfloat16") == 1.0  # bfloat16 keeps 7 mantissa bits
    assert scale_ulp(0.0, 0.0, "float32") == 0.0
    assert math.isinf(scale_ulp(1.0, 0.0, "float32"))


def test_kl_of_one_hot_softmaxes_is_labelled():
    a = np.array([[[0.0, 60.0, 1.0], [0.0, 1.0, 2.0]]], np.float32)  # row 0 one-hot in float32 (e^-59 < 2^-23)
    b = a.copy()
    b[0, 0, 0] += 3.0  # a large logit change that a one-hot softmax does not show
    b[0, 1, 2] += 0.1
    s = point_stats(a, b, logits=True)
    assert s.kl_degenerate == 0.5 and s.kl_max > 1e-4  # row 1 is informative
    assert "50% of positions one-hot" in kl_words(s)
    only = point_stats(a[:, :1], b[:, :1], logits=True)
    assert only.kl_degenerate == 1.0 and only.kl_max < 1e-20 and "degenerate" in kl_words(only)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("verdict")
    cfg = TINY_VARIANTS["tiny-pg2-gqa"]
    params = spec.random_params(cfg, seed=3)
    np.savez(d / "a.npz", **{spec.NPZ_PREFIX + k: v for k, v in params.items()})
    return str(d / "a.npz"), str(save_inputs(d / "in.npz", make_inputs(cfg)))


def test_teacher_forced_torch_against_jax_passes_on_local_errors(tiny):
    ck, inp = tiny
    c = compare("torch", "jax", ckpt=ck, inputs=inp, teacher_forced=True, isolate=False)
    v = c.verdict()
    assert c and v.basis == "local" and v.units == 5 + 5 and not v.not_covered  # 2 + 3 blocks, 5 units between
    assert v.covered == (
        "the whole graph (stem, 2 ViT + 3 LLM blocks, ViT final norm, projector, "
        "image/text concatenation + embedding scale, final norm, head)"
    )
    assert v.words.endswith(f"local: {v.covered}")
    assert v.drift == c.records[-1].stats.max_rel and v.drift_point == "logits"
