"""parity.compare statistics and judgement against values written out by hand (or by a direct numpy formula)."""

from __future__ import annotations

import json
import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parity.compare import stats as st_mod
from parity.compare import tolerances as tol
from parity.compare.stats import PointStats, point_stats
from parity.errors import ConfigError


def test_hand_computed_statistics():
    a = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    b = np.array([[1.0, 2.0], [3.5, 4.0]], np.float32)
    s = point_stats(a, b)
    assert s.max_abs == 0.5 and s.mean_abs == 0.125 and s.compared == 4
    assert s.max_rel == 0.5 / 4
    assert s.rms_rel == pytest.approx(math.sqrt(0.25 / 30))
    assert s.cosine == pytest.approx((1 + 4 + 10.5 + 16) / math.sqrt(30 * (1 + 4 + 12.25 + 16)))
    assert s.sqnr_db == pytest.approx(10 * math.log10(30 / 0.25))
    assert s.worst_index == (1, 0) and (s.worst_a, s.worst_b) == (3.0, 3.5)
    # 3 -> 3.5 in float32: 0.5 / 2^-22 (the spacing of [2, 4)) representable steps.
    assert s.ulp == 2**21
    same = point_stats(a, a)
    assert same.max_abs == 0 and same.sqnr_db == math.inf and same.cosine == pytest.approx(1.0) and same.ulp == 0


def test_padding_positions_are_left_out_and_indices_stay_in_the_full_shape():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2, 4, 3)).astype(np.float32)
    b = a.copy()
    b[1, 3, 0] += 100.0  # a padding position: ignored
    b[0, 2, 1] += 0.25
    valid = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], bool)
    s = point_stats(a, b, valid=valid)
    assert s.compared == 7 * 3 and s.max_abs == pytest.approx(0.25, rel=1e-6) and s.worst_index == (0, 2, 1)
    assert point_stats(a, b).worst_index == (1, 3, 0)  # without the mask it is found


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(1, 7), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_chunked_accumulation_equals_one_pass(b, s, d, seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(b, s, d)).astype(np.float32)
    x = (a + rng.normal(size=a.shape) * 1e-2).astype(np.float32)
    valid = rng.random((b, s)) < 0.8
    valid[0, 0] = True
    whole = point_stats(a, x, valid=valid, logits=True)
    old = st_mod.CHUNK_ELEMENTS
    st_mod.CHUNK_ELEMENTS = d  # one row per chunk
    try:
        chunked = point_stats(a, x, valid=valid, logits=True)
    finally:
        st_mod.CHUNK_ELEMENTS = old
    for f in ("max_abs", "max_rel", "ulp", "worst_index", "kl_max", "top1", "top5", "compared"):
        assert getattr(chunked, f) == getattr(whole, f), f
    for f in ("mean_abs", "rms_rel", "cosine", "kl_mean"):
        assert getattr(chunked, f) == pytest.approx(getattr(whole, f), rel=1e-12), f
    # Against a direct float64 formula over the kept elements.
    ka, kx = a[valid].astype(np.float64), x[valid].astype(np.float64)
    assert whole.rms_rel == pytest.approx(np.linalg.norm(kx - ka) / np.linalg.norm(ka), rel=1e-12)
    assert whole.mean_abs == pytest.approx(np.abs(kx - ka).mean(), rel=1e-12)


@pytest.mark.parametrize(
    "dtype,one_up",
    [("float32", np.nextafter(np.float32(1), np.float32(2))), ("bfloat16", 1 + 2.0**-7), ("float16", 1 + 2.0**-10)],
)
def test_ulp_distance_in_the_compared_dtype(dtype, one_up):
    a = np.array([1.0, -0.0, 5.0], np.float32)
    b = np.array([one_up, 0.0, 5.0], np.float32)
    assert point_stats(a, b, dtype).ulp == 1
    tiny = (
        float(np.finfo(np.float32).smallest_subnormal)
        if dtype == "float32"
        else float(ml_dtypes.finfo(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16).smallest_subnormal)
    )
    # -tiny and +tiny are two steps apart (through zero).
    assert point_stats(np.array([-tiny], np.float32), np.array([tiny], np.float32), dtype).ulp == 2


def test_logit_statistics():
    a = np.array([[[2.0, 1.0, 0.0, -1.0, -2.0, -3.0], [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]]], np.float32)
    b = a.copy()
    b[0, 1] = [0.0, 2.0, 1.0, 0.0, 0.0, -5.0]  # the argmax moves at position 1
    s = point_stats(a, b, logits=True)
    p = np.exp(a[0, 1].astype(np.float64))
    p /= p.sum()
    q = np.exp(b[0, 1].astype(np.float64))
    q /= q.sum()
    assert s.kl_max == pytest.approx(float(np.sum(p * np.log(p / q))), rel=1e-12)
    assert s.kl_mean == pytest.approx(s.kl_max / 2, rel=1e-12) and s.kl_worst_position == (0, 1)
    assert s.top1 == 0.5
    # top-5 at position 1: a's are {2, 0, 1, 3, 4} (ties broken by index), b's exclude 5 too -> full overlap.
    assert s.top5 == 1.0
    only_first = point_stats(a, b, logits=True, dist_valid=np.array([[True, False]]))
    assert only_first.kl_max == 0.0 and only_first.top1 == 1.0 and only_first.max_abs == s.max_abs


def test_non_finite_values_are_counted_and_fail():
    a = np.array([1.0, np.nan, 3.0, 4.0], np.float32)
    b = np.array([1.0, 2.0, np.inf, 4.0], np.float32)
    s = point_stats(a, b)
    assert (s.nan_a, s.inf_a, s.nan_b, s.inf_b, s.compared) == (1, 0, 0, 1, 2)
    j = tol.PROFILES and tol.tolerances("bf16", None, {}, {}).judge("logits", s)
    assert not j and "non-finite" in str(j) and j.required == {"max_rel": None}


def test_stats_round_trip_through_json():
    s = point_stats(np.ones((2, 3), np.float32), np.ones((2, 3), np.float32), logits=True)
    back = PointStats.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back == s and back.sqnr_db == math.inf


# -- judgement ----------------------------------------------------------------------------------------------------
def _stats(max_rel, **kw):
    base = dict(
        shape=(1,),
        compared=1,
        max_abs=max_rel,
        mean_abs=0.0,
        max_rel=max_rel,
        rms_rel=max_rel,
        cosine=1.0,
        sqnr_db=60.0,
        ulp=1,
        ulp_dtype="float32",
        worst_index=(0,),
        worst_a=1.0,
        worst_b=1.0,
    )
    return PointStats(**{**base, **kw})


def test_judgement_is_truthy_and_names_the_minimum_tolerance():
    t = tol.tolerances("fp32", None, {}, {})
    ok, bad = t.judge("llm/layer03/out", _stats(5e-5)), t.judge("llm/layer03/out", _stats(3e-3))
    assert ok and not bad
    assert bad.required == {"max_rel": 3e-3} and "would pass with max_rel <= 0.003" in str(bad)
    assert t.judge("llm/layer03/mlp", _stats(1.5e-4))  # branch points have their own bound
    assert not t.judge("llm/layer03/out", _stats(1.5e-4))


def test_profile_from_manifests():
    cpu32, b16, f16 = {"dtype": "float32", "device": "cpu (x86_64)"}, {"dtype": "bfloat16"}, {"dtype": "float16"}
    gpu_high = {"dtype": "float32", "device": "cuda:0 (NVIDIA H200)", "precision": "high"}
    gpu_highest = {**gpu_high, "precision": "highest"}
    assert tol.choose_profile(cpu32, cpu32) == "fp32"
    assert tol.choose_profile(cpu32, gpu_highest) == "fp32"
    assert tol.choose_profile(cpu32, gpu_high) == "tf32"
    assert tol.choose_profile(cpu32, f16) == "f16" and tol.choose_profile(f16, b16) == "bf16"
    assert tol.choose_profile(cpu32, {"dtype": "float32", "device": "TPU v5e", "precision": "default"}) == "bf16"
    assert tol.compared_dtype(cpu32, b16) == "bfloat16" and tol.compared_dtype(cpu32, cpu32) == "float32"


@pytest.mark.parametrize("fmt", ["toml", "json"])
def test_policy_rules_come_first_and_may_change_the_statistic(tmp_path, fmt):
    path = tmp_path / f"p.{fmt}"
    if fmt == "toml":
        path.write_text(
            'profile = "fp32"\n[[rules]]\npoints = "llm/layer*/out"\nrms_rel = 0.01\n'
            '[[rules]]\npoints = ["logits"]\nmax_rel = 0.5\ntop1 = 0.9\n'
        )
    else:
        path.write_text(
            json.dumps(
                {
                    "profile": "fp32",
                    "rules": [
                        {"points": "llm/layer*/out", "rms_rel": 0.01},
                        {"points": ["logits"], "max_rel": 0.5, "top1": 0.9},
                    ],
                }
            )
        )
    t = tol.tolerances(None, str(path), {"dtype": "bfloat16"}, {})
    assert t.profile == "fp32"  # the policy's profile beats the manifests' choice
    j = t.judge("llm/layer01/out", _stats(0.3, rms_rel=0.005))
    assert j and [c.stat for c in j.checks] == ["rms_rel"] and j.source == f"policy p.{fmt}"
    assert not t.judge("logits", _stats(0.1, top1=0.8))  # top1 is a lower bound
    assert t.judge("logits", _stats(0.1, top1=0.95))
    assert not t.judge("img/encoder_norm", _stats(0.3))  # falls through to the fp32 profile
    assert tol.tolerances("bf16", str(path), {}, {}).profile == "bf16"  # --profile beats the policy's


@pytest.mark.parametrize(
    "text,needle",
    [
        ('[[rules]]\npoints = "x"\nmax_rell = 1\n', "rules[0].max_rell"),
        ('[[rules]]\npoints = "x"\nmax_rel = "big"\n', "rules[0].max_rel"),
        ("[[rules]]\nmax_rel = 1\n", "rules[0]"),
        ('profile = "fp128"\n', "profile"),
        ("rulez = []\n", "rulez"),
        ("[[rules\n", "not a TOML or JSON policy"),
    ],
)
def test_bad_policy_names_the_key(tmp_path, text, needle):
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        tol.load_policy(str(path))
    assert needle in str(e.value) and str(path) in str(e.value)
