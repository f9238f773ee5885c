"""The backend protocol and the typed job: every built-in backend satisfies parity.backend's protocol (torch and jax
the block-level one too, transformers not); the registry refuses unknown names and objects that lack a method,
naming what is missing; the one list of dtypes / precisions keys the frameworks' dtype maps and the CLI's choices;
a Job survives JSON (the worker's stdin) unchanged; one record_run serves capture, compare and golden."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os

import pytest
from click.testing import CliRunner

from parity import backend
from parity.conventions import PRESETS
from parity.errors import ConfigError
from parity.job import Generate, Job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_builtin_backends_implement_the_protocol():
    assert backend.names()[:3] == ["torch", "jax", "transformers"]
    for name in ("torch", "jax", "transformers"):
        if name == "jax":
            pytest.importorskip("jax")
        if name == "transformers":
            pytest.importorskip("transformers")
        b = backend.get(name)
        assert isinstance(b, backend.Backend) and b.name == name and backend.get(name) is b
        assert backend.teacher_forcing(name) == (name != "transformers")
        assert isinstance(b.build_options, tuple)


def test_protocol_methods_keep_the_implementations_signatures():
    """The protocol's build_model / forward / generate take the parameters each implementation's functions take."""
    from parity.torch_impl import api as torch_api

    for meth in ("build_model", "forward", "generate", "vit_block", "llm_block"):
        proto = list(inspect.signature(getattr(backend.BlockBackend, meth)).parameters)[1:]
        impl = list(inspect.signature(getattr(torch_api, meth)).parameters)
        assert [p for p in proto if p != "options"] == impl[: len([p for p in proto if p != "options"])], meth


def test_unknown_backend_is_a_config_error_naming_the_available_ones():
    with pytest.raises(ConfigError, match="'nope'; available: torch, jax, transformers"):
        backend.get("nope")


def test_an_object_lacking_a_method_is_refused_by_name(monkeypatch):
    monkeypatch.setitem(backend.BUILTIN, "half", "parity.conventions:Conventions")  # a class, no backend
    with pytest.raises(
        ConfigError, match=r"'half' \(parity.conventions:Conventions\) does not implement .* lacks \['name'"
    ):
        backend.get("half")


def test_one_list_of_dtypes_and_precisions():
    from parity.torch_impl import api as torch_api

    assert tuple(torch_api.DTYPES) == backend.DTYPES and torch_api.PRECISIONS == backend.PRECISIONS
    from parity.cli import main

    help_text = CliRunner().invoke(main, ["capture", "--help"]).output
    assert "[float32|bfloat16|float16|float64]" in help_text and "[highest|high|default]" in help_text
    assert "--impl [torch|jax|transformers]" in help_text


def test_job_round_trips_through_json():
    from parity.config import TINY_VARIANTS

    job = Job(
        "ckpt.npz",
        "in.npz",
        "jax",
        PRESETS["transformers"],  # a Conventions object: kept as its dict
        ["final_softcap=always"],
        TINY_VARIANTS["tiny-pg1-mqa"],  # a PaliGemmaConfig: kept as its dict
        "bfloat16",
        "float32",
        "gpu:0",
        "high",
        "data=1,model=1",
        capture="/tmp/a.safetensors",
        points=["img/*", "logits"],
        teacher_from="/tmp/ref.safetensors",
        teacher_output="/tmp/a.teacher.safetensors",
        generate=Generate(5, forced_from="/tmp/g.safetensors", record={"forced_tokens": True}, output="/tmp/g2"),
    )
    again = Job.from_json(job.to_json())
    assert again == job and isinstance(again.generate, Generate) and again.points == ("img/*", "logits")
    assert again.conventions == PRESETS["transformers"] and again.config_arg == TINY_VARIANTS["tiny-pg1-mqa"]
    assert json.loads(again.to_json()) == json.loads(job.to_json())
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.impl = "torch"
    with pytest.raises(ValueError, match="unknown fields"):
        Job.from_json(json.dumps({**json.loads(job.to_json()), "surprise": 1}))


def test_sampling_record_of_a_comparison_decode_and_of_the_generate_command():
    assert Generate(4).sampling() == {"greedy": True, "max_new_tokens": 4, "ignore_eos": True}
    full = Generate(4, greedy=False, top_k=3, seed=7, ignore_eos=False).sampling()
    assert full == {
        "greedy": False,
        "temperature": 1.0,
        "top_k": 3,
        "top_p": None,
        "seed": 7,
        "max_new_tokens": 4,
        "ignore_eos": False,
    }


def test_capture_compare_and_golden_share_record_run():
    """No module runs a side its own way: run, compare.sides and golden (its runs: golden_run) call
    parity.pipeline.record_run."""
    for rel in ("parity/run.py", "parity/compare/sides.py", "parity/golden_run.py"):
        with open(os.path.join(ROOT, rel)) as f:
            src = f.read()
        assert "record_run(" in src and "build_model(" not in src and ".forward(" not in src, rel
