"""parity compare across frameworks: the PyTorch against the JAX implementation on every tiny config (both presets,
propagated and teacher-forced), and a change planted on the JAX side only, singled out by both modes."""

from __future__ import annotations

import numpy as np
import pytest
from torch_fixtures import make_inputs

pytest.importorskip("jax")

from test_compare import write_ckpt

from parity import points, spec
from parity.compare import compare
from parity.config import TINY_VARIANTS
from parity.inputs import save_inputs

GQA = TINY_VARIANTS["tiny-pg2-gqa"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("compare-jax")
    out = {"dir": d}
    for name, cfg in TINY_VARIANTS.items():
        out[name] = (
            write_ckpt(d / f"{name}.npz", spec.random_params(cfg, seed=4)),
            str(save_inputs(d / f"{name}.inputs.npz", make_inputs(cfg, seed=1))),
        )
    return out


def failing(c):
    return [
        f"{r.point}: {r.judgement} / local {r.local_judgement}"
        for r in c.records
        if not r.passed or (r.local_judgement is not None and not r.local_judgement)
    ]


@pytest.mark.parametrize("convention", ["big_vision", "transformers"])
@pytest.mark.parametrize("name", list(TINY_VARIANTS))
def test_torch_vs_jax_passes_fp32(files, name, convention):
    ck, inp = files[name]
    c = compare(
        "torch",
        "jax",
        ckpt=ck,
        inputs=inp,
        convention=convention,
        layer_by_layer=True,
        teacher_forced=True,
        isolate=False,
    )
    assert c.tolerances.profile == "fp32" and c and c.exit_code == 0, failing(c)
    assert c.first_divergence is None and c.first_local_divergence is None
    assert len(c.records) == len(points.forward_points(TINY_VARIANTS[name]))
    assert {d["key"] for d in c.differences} >= {"impl"}
    # Every block and every unit between them was also run teacher-forced, and the two frameworks agree far inside
    # the profile.
    cfg = TINY_VARIANTS[name]
    local = [r.point for r in c.records if r.local is not None]
    units = list(points.graph_units(cfg))
    assert len(local) == 2 * cfg.vision.depth + 3 * cfg.text.depth + len(units) and set(units) <= set(local)
    assert max(r.stats.max_rel for r in c.records) < 1e-5


@pytest.mark.parametrize(
    "keys, first",
    [
        (["llm/layers/mlp/gating_einsum", "llm/layers/mlp/linear"], points.llm_block_mlp(1)),
        (
            [
                "img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel",
                "img/Transformer/encoderblock/MlpBlock_0/Dense_1/kernel",
            ],
            points.img_block_out(1),
        ),
    ],
    ids=["llm", "vit"],
)
def test_change_planted_on_the_jax_side_is_singled_out(files, keys, first):
    ck, inp = files["tiny-pg2-gqa"]
    params = spec.random_params(GQA, seed=4)
    for k in keys:
        params[k][1] *= np.float32(1.01)
    ck_b = write_ckpt(files["dir"] / f"planted-{first.replace('/', '_')}.npz", params)
    c = compare(
        "torch", "jax", ckpt=ck, against=ck_b, inputs=inp, layer_by_layer=True, teacher_forced=True, isolate=False
    )
    assert not c and c.exit_code == 1
    assert c.first_divergence == first and c.first_local_divergence == first
    tower = first.split("/")[0]
    changed = {first, first.replace("/mlp", "/out")}
    for r in c.records:
        if r.local_judgement is None or not r.point.startswith(tower):
            continue
        # the local (teacher-forced) error fails exactly at the changed block, whatever was inherited before it
        assert bool(r.local_judgement) == (r.point not in changed), (r.point, str(r.local_judgement))
