"""The backend protocol is public: tests/example_backend, a package outside parity, is installed into a scratch
directory (pip install --no-deps --target, never into the environment) and registers `example` under the entry-point
group `parity.backends`. With that directory on PYTHONPATH it is a side everywhere: listed by --impl (without torch
being imported to list it), `capture --impl example`, `compare --a torch --b example` (each side in its own process;
teacher-forced too, since it implements the block-level calls), `golden check --impl example`. A fault planted in the
example backend (one weight of layer 1's MLP nudged by 1e-3) fails the comparison at that block's MLP branch, where
teacher forcing places it too: the comparison measures the outside backend, it does not pass by construction."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "golden")
CKPT = os.path.join(GOLDEN, "tiny-pg1-mqa.npz")
INPUTS = os.path.join(GOLDEN, "tiny-inputs.npz")
TORCH_VS_EXAMPLE = ("compare", CKPT, "--a", "torch", "--b", "example", "--inputs", INPUTS)
NUDGE = "llm/layers/mlp/linear:1,5,7:1e-3"  # layer 1's MLP output projection, one element


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    """The example package installed into a scratch directory (built from a copy: the source tree stays clean)."""
    tmp = tmp_path_factory.mktemp("plugin")
    src = shutil.copytree(os.path.join(ROOT, "tests", "example_backend"), tmp / "src")
    target = tmp / "site"
    p = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", target, src],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    return str(target)


def parity(plugin_path, *args, nudge=None):
    env = {k: v for k, v in os.environ.items() if k != "PARITY_EXAMPLE_NUDGE"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, plugin_path])
    if nudge:
        env["PARITY_EXAMPLE_NUDGE"] = nudge
    return subprocess.run(
        [sys.executable, "-m", "parity.cli", *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT
    )


def test_the_registered_backend_is_listed_without_importing_a_framework(plugin_path):
    code = (
        "import sys; from parity import backend; import parity.cli; "
        "print(backend.names()); print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'jax')))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, plugin_path])}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    names, loaded = p.stdout.strip().splitlines()
    assert "'example'" in names and loaded == "[]", p.stderr[-1000:]
    for cmd in (["capture", "--help"], ["generate", "--help"], ["golden", "check", "--help"]):
        out = parity(plugin_path, *cmd).stdout
        assert "[torch|jax|transformers|example]" in out, (cmd, out)


def test_compare_torch_against_the_example_backend_teacher_forced(plugin_path):
    r = parity(plugin_path, *TORCH_VS_EXAMPLE, "--layer-by-layer", "--teacher-forced", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(r.stdout)
    assert d["passed"] and d["teacher_forced"] and d["sides"]["B"]["manifest"]["impl"] == "example"
    assert d["sides"]["B"]["manifest"]["example_backend"] == "0.1.0"  # the backend's manifest() fields
    local = {p["point"] for p in d["points"] if p.get("local")}
    assert {"img/block00/out", "llm/layer00/attn", "llm/layer01/mlp", "llm/layer01/out"} <= local


def test_a_fault_in_the_example_backend_is_found_and_placed(plugin_path):
    r = parity(plugin_path, *TORCH_VS_EXAMPLE, "--layer-by-layer", "--teacher-forced", "--json", nudge=NUDGE)
    assert r.returncode == 1, r.stderr[-2000:]
    d = json.loads(r.stdout)
    assert d["first_divergence"] == "llm/layer01/mlp" and d["first_local_divergence"] == "llm/layer01/mlp"
    before = d["points"][: [p["point"] for p in d["points"]].index("llm/layer01/mlp")]
    assert all(p["judgement"]["passed"] for p in before)


def test_capture_generate_and_golden_check_run_the_example_backend(plugin_path, tmp_path):
    out = tmp_path / "cap.safetensors"
    r = parity(plugin_path, "capture", CKPT, "--impl", "example", "--inputs", INPUTS, "-o", out, "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["impl"] == "example" and out.is_file()
    r = parity(plugin_path, "golden", "check", os.path.join(GOLDEN, "tiny-pg1-mqa.bundle"), "--impl", "example")
    assert r.returncode == 0, r.stderr[-2000:] + r.stdout[-2000:]
    r = parity(plugin_path, *TORCH_VS_EXAMPLE, "--generate", "3", "--teacher-forced", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["sides"]["B"]["manifest"]["impl"] == "example"
