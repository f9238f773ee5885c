"""torch_impl and jax_impl read side by side: the same definitions in the same order, the same block-argument
checks (one framework-free helper), and a run leaves the process's matmul precision as it found it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from torch_fixtures import make_inputs

from parity import points, spec
from parity.config import TINY_VARIANTS
from parity.conventions import PRESETS
from parity.jax_impl import api as jax_api
from parity.torch_impl import api as torch_api

ROOT = Path(__file__).resolve().parents[1]
CFG = TINY_VARIANTS["tiny-pg2-gqa"]
# The one definition a side has alone: jax's weight-layout-preserving matmul (torch gets it from memory order).
ONE_SIDED = {"grouped_matmul"}


def _definitions(path: Path) -> list[str]:
    """Top-level functions and classes with their methods, in file order (torch's forward = jax's __call__)."""
    names = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name not in ONE_SIDED:
            names.append(node.name)
            if isinstance(node, ast.ClassDef):
                methods = [m.name for m in node.body if isinstance(m, ast.FunctionDef)]
                names += [f"{node.name}.{'__call__' if m == 'forward' else m}" for m in methods]
    return names


@pytest.mark.parametrize("module", ["attention", "decoder", "vision", "model", "projector", "precision"])
def test_model_files_define_the_same_things_in_the_same_order(module):
    torch_defs = _definitions(ROOT / "parity" / "torch_impl" / f"{module}.py")
    jax_defs = _definitions(ROOT / "parity" / "jax_impl" / f"{module}.py")
    assert torch_defs == jax_defs


def test_stream_hooks_define_the_same_things_in_the_same_order():
    """The block-streamed run's hooks (parity/stream.py and parity/stream_generate.py drive both): the same public
    functions in the same order (jax adds its jitted bodies, `_patch`, `_llm_block`, `_unit`, `_cached_block`, ...)."""
    torch_defs = [d for d in _definitions(ROOT / "parity/torch_impl/stream.py") if not d.startswith("_")]
    jax_defs = [d for d in _definitions(ROOT / "parity/jax_impl/stream.py") if not d.startswith("_")]
    forward = ["skeleton", "manifest", "patch", "vit_block", "llm_block", "unit"]
    generation = ["Decoding", "decoding", "advance", "cached_block", "embed", "head", "sampler", "caches"]
    assert torch_defs == jax_defs == forward + generation


def test_generation_steps_are_the_same_functions():
    torch_defs = _definitions(ROOT / "parity/torch_impl/generate.py")
    jax_defs = _definitions(ROOT / "parity/jax_impl/generate.py")
    shared = ["KVCache", "init_cache", "_cache_masks", "prefill", "decode_step", "sample", "Generation", "generate"]
    assert [d for d in torch_defs if d in shared] == shared == [d for d in jax_defs if d in shared]


def test_blockcheck_imports_no_framework():
    code = "import sys, parity.blockcheck; print(sorted({'torch', 'jax', 'flax'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def models():
    params = spec.random_params(CFG, seed=11)
    return {
        "torch": (torch_api, torch_api.build_model(CFG, PRESETS["transformers"], params=params, precision="high")),
        "jax": (jax_api, jax_api.build_model(CFG, PRESETS["transformers"], params=params, precision="high")),
    }


def _error(fn, *args) -> str:
    with pytest.raises(ValueError) as e:
        fn(*args)
    return str(e.value)


def test_block_arguments_are_checked_alike(models):
    v, t = CFG.vision, CFG.text
    inputs = make_inputs(CFG)
    s = CFG.num_image_tokens + inputs["text"].shape[1]
    x_img, x_llm = np.zeros((2, CFG.num_image_tokens, v.width), np.float32), np.zeros((2, s, t.width), np.float32)
    got = {}
    for impl, (api, m) in models.items():
        got[impl] = [
            _error(api.vit_block, m, v.depth, x_img),
            _error(api.vit_block, m, -1, x_img),
            _error(api.vit_block, m, 0, x_img[..., :-1]),
            _error(api.llm_block, m, t.depth, x_llm, inputs),
            _error(api.llm_block, m, 0, x_llm[0], inputs),
        ]
    assert (
        got["torch"]
        == got["jax"]
        == [
            f"ViT block {v.depth}: the model has blocks 0..{v.depth - 1}",
            f"ViT block -1: the model has blocks 0..{v.depth - 1}",
            f"ViT block input: expected float[B, T, {v.width}], found shape {x_img[..., :-1].shape}",
            f"LLM block {t.depth}: the model has blocks 0..{t.depth - 1}",
            f"LLM block input: expected float[B, T, {t.width}], found shape {x_llm[0].shape}",
        ]
    )


def _runs(api, m):
    """Every run call of an api, each a thunk."""
    inputs = make_inputs(CFG)
    fwd = api.forward(m, inputs, [points.IMG_POS_EMBED, points.LLM_INPUT])
    return {
        "forward": lambda: api.forward(m, inputs),
        "generate": lambda: api.generate(m, inputs, 2),
        "vit_block": lambda: api.vit_block(m, 0, fwd[points.IMG_POS_EMBED]),
        "llm_block": lambda: api.llm_block(m, 0, fwd[points.LLM_INPUT], inputs),
    }


@pytest.mark.parametrize("precision", ["high", "default"])
def test_torch_runs_leave_the_matmul_precision_as_found(models, precision):
    """Each run call computes under the model's precision ("default": whatever the process has) and restores the
    process-wide setting afterwards, also when the model was built with another precision."""
    api = models["torch"][0]
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        m = api.build_model(CFG, PRESETS["transformers"], params=spec.random_params(CFG, seed=11), precision=precision)
        assert torch.get_float32_matmul_precision() == "medium"  # building sets nothing
        seen = []
        record = lambda *_: seen.append(torch.get_float32_matmul_precision())
        hooks = [b.register_forward_pre_hook(record) for b in (m.llm.layers[0], m.img.Transformer.encoderblock[0])]
        for name, run in _runs(api, m).items():
            seen.clear()
            run()
            assert torch.get_float32_matmul_precision() == "medium", name
            assert seen and set(seen) == {"medium" if precision == "default" else precision}, (name, seen)
        for h in hooks:
            h.remove()
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("precision", ["high", "default"])
def test_jax_runs_leave_the_matmul_precision_as_found(models, monkeypatch, precision):
    """As torch: jax's default_matmul_precision is the model's inside a run call and as found after it."""
    api, _ = models["jax"]
    m = api.build_model(CFG, PRESETS["transformers"], params=spec.random_params(CFG, seed=11), precision=precision)
    seen = []
    for fn in ("_forward", "_generate", "_vit_block", "_llm_block"):
        original = getattr(api, fn)

        def spy(*a, _original=original, **k):
            seen.append(jax.config.jax_default_matmul_precision)
            return _original(*a, **k)

        monkeypatch.setattr(api, fn, spy)
    with jax.default_matmul_precision("bfloat16"):
        for name, run in _runs(api, m).items():
            seen.clear()
            run()
            assert jax.config.jax_default_matmul_precision == "bfloat16", name
            assert seen == [precision], (name, seen)
    assert jax.config.jax_default_matmul_precision is None


def test_backward_files_define_the_same_things_in_the_same_order():
    """The training step point by point (issue 23): the same definitions in the same order; each side's own
    helpers are named (torch's tensor-to-numpy, jax's jitted steps and their probes)."""
    torch_defs = _definitions(ROOT / "parity/torch_impl/backward.py")
    jax_defs = _definitions(ROOT / "parity/jax_impl/backward.py")
    shared = ["train_points", "unit_vjps", "_check", "_context", "_block", "_unit", "_owned", "_canonical"]
    shared += ["_leaf_points", "_input"]
    streamed = ["stream_context", "stream_unit", "stream_head", "stream_loss"]  # parity/stream_train.py's
    assert torch_defs == shared + ["_numpy"] + streamed
    jitted = ["_stream_kind", "_stream_run", "_stream_forward", "_stream_vjp", "_stream_loss"]
    assert jax_defs == shared + ["_probes", "_points", "_vjps"] + streamed + jitted
