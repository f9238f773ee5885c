"""parity.training's options: the globs over canonical leaves, the refused values, the JSON round trip."""

from __future__ import annotations

import math

import pytest

from parity import spec
from parity.config import TINY_VARIANTS
from parity.errors import ConfigError
from parity.training import StepRecord, TrainOptions, TrainResult, trainable_leaves

LEAVES = list(spec.canonical_shapes(TINY_VARIANTS["tiny-pg2-gqa"]))


def test_default_selects_the_llm_attention_leaves_only():
    got = trainable_leaves(TrainOptions(), LEAVES)
    assert got and all(k.startswith("llm/layers/attn/") for k in got)
    assert got == [k for k in LEAVES if k.startswith("llm/layers/attn/")]  # spec order


def test_all_and_several_globs():
    assert trainable_leaves(TrainOptions(trainable=("all",)), LEAVES) == LEAVES
    got = trainable_leaves(TrainOptions(trainable=("llm/final_norm/*", "img/head/*")), LEAVES)
    assert got == [k for k in LEAVES if k.startswith(("llm/final_norm/", "img/head/"))]


def test_a_glob_matching_nothing_lists_every_leaf():
    with pytest.raises(ConfigError) as e:
        trainable_leaves(TrainOptions(trainable=("llm/layers/atn/*",)), LEAVES)
    assert "llm/layers/atn/*" in str(e.value) and all(k in str(e.value) for k in LEAVES)


@pytest.mark.parametrize(
    "kw,word",
    [
        ({"steps": 0}, "--steps"),
        ({"steps": 1.5}, "--steps"),
        ({"lr": -0.1}, "--lr"),
        ({"lr": math.nan}, "--lr"),
        ({"lr": math.inf}, "--lr"),
        ({"frozen_dtype": "bfloat16"}, "--frozen-dtype"),
        ({"vit_matmul_dtype": "int8"}, "--vit-matmul-dtype"),
        ({"trainable": ()}, "--trainable"),
    ],
)
def test_refused_options_name_their_flag(kw, word):
    with pytest.raises(ConfigError, match=word):
        TrainOptions(**kw).check()


def test_round_trip_and_unknown_fields():
    o = TrainOptions(trainable=("all",), steps=3, lr=0.0, frozen_dtype="float16")
    o.check()
    assert TrainOptions.from_dict(o.to_dict()) == o
    with pytest.raises(ConfigError, match="unknown"):
        TrainOptions.from_dict({**o.to_dict(), "momentum": 0.9})


def test_first_nonfinite_names_step_and_leaf():
    ok = StepRecord(1, 1.0, [1.0], 2.0, {"a": 2.0}, {"a": 4.0})
    bad = StepRecord(2, 0.5, [0.5], math.nan, {"a": 1.0, "b": math.inf}, {"a": 4.0, "b": 0.0})
    assert TrainResult([ok], {}, {}).first_nonfinite() is None
    assert TrainResult([ok, bad], {}, {}).first_nonfinite() == "step 2: gradient of b"
    assert ok.to_dict()["leaf_grad_to_weight"] == {"a": 0.5}
    assert bad.to_dict()["leaf_grad_to_weight"]["b"] is None
