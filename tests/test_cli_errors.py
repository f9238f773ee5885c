"""Every bad option or environment: one line on stderr, exit status 2, a JSON error object under --json, and
nothing written. Ctrl-C: one line, status 130, promptly, even while the model sits in a long operation."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from parity.cli import main
from parity.inputs import load_inputs
from tests import signal_child

GOLDEN = os.path.join(os.path.dirname(__file__), "..", "golden")
CKPT = os.path.join(GOLDEN, "tiny-pg2-gqa.b16.npz")
INPUTS = os.path.join(GOLDEN, "tiny-inputs.npz")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(r, *fragments):
    """Exit 2, exactly one line on stderr starting with `error:`, containing every fragment, no traceback."""
    assert r.exit_code == 2, (r.exit_code, r.stderr, r.exception)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    assert "Traceback" not in r.stderr + r.stdout
    return lines[0]


def capture(tmp_path, *extra):
    return invoke("capture", CKPT, "--inputs", INPUTS, "-o", tmp_path / "c.safetensors", *extra)


def generate(*extra):
    return invoke("generate", CKPT, "--inputs", INPUTS, "--max-new-tokens", "3", *extra)


# -- devices ------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.backends.cuda.is_built(), reason="this torch has CUDA")
def test_device_cuda_on_cpu_only_torch(tmp_path):
    one_line_error(capture(tmp_path, "--device", "cuda"), "--device 'cuda'", "without CUDA", "--device cpu")
    assert not os.listdir(tmp_path)


def test_device_gpu_names_torchs_spelling(tmp_path):
    one_line_error(capture(tmp_path, "--device", "gpu"), "use --device cuda")
    one_line_error(generate("--device", "gpu:1"), "use --device cuda:1")


def test_device_unknown(tmp_path):
    one_line_error(capture(tmp_path, "--device", "tpu0"), "'tpu0'", "unknown device", "cpu, cuda or cuda:N")


def test_device_resolved_by_the_implementation():
    from parity.torch_impl import api

    assert api.resolve_device(" CPU ") == "cpu"
    assert api.device_description("cpu").startswith("cpu (")


# -- sampling -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, fragment",
    [
        (("--top-k", "0"), "--top-k"),
        (("--top-k", "-3"), "--top-k"),
        (("--top-p", "0"), "--top-p"),
        (("--top-p", "1.5"), "--top-p"),
        (("--top-p", "-0.1"), "--top-p"),
        (("--temperature", "0"), "--temperature"),
        (("--temperature", "-1"), "--temperature"),
        (("--max-new-tokens", "0"), "--max-new-tokens"),
        (("--sample", "--seed", "-1"), "--seed"),
        (("--sample", "--seed", str(2**64)), "--seed"),
    ],
)
def test_sampling_values_refused(args, fragment):
    one_line_error(generate(*args), fragment)


@pytest.mark.parametrize("opt", [("--temperature", "0.7"), ("--top-k", "5"), ("--top-p", "0.9")])
def test_greedy_with_sampling_options_refused(opt):
    one_line_error(generate("--greedy", *opt), "--greedy contradicts", opt[0])


def test_library_checks_sampling_too():
    from parity.errors import UsageError
    from parity.run import check_sampling

    for kw in (dict(temperature=0.0), dict(top_k=0), dict(top_p=1.01), dict(top_p=0.0)):
        with pytest.raises(UsageError):
            check_sampling(False, **{"temperature": None, "top_k": None, "top_p": None, **kw})
    with pytest.raises(UsageError, match="--seed"):
        check_sampling(False, None, None, None, seed=2**64)
    with pytest.raises(UsageError, match="--greedy contradicts --top-p"):
        check_sampling(True, None, None, 0.5)
    check_sampling(False, 0.5, 3, 1.0)  # valid


def test_sampling_options_imply_sample():
    r = generate("--top-k", "5", "--json")
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)["manifest"]["sampling"]
    assert s["greedy"] is False and s["top_k"] == 5 and s["temperature"] == 1.0


# -- points -------------------------------------------------------------------------------------------------------
def test_points_near_miss_is_suggested(tmp_path):
    one_line_error(capture(tmp_path, "--points", "llm/layer1/out"), "'llm/layer1/out'", "did you mean llm/layer01/out")
    assert not os.listdir(tmp_path)


def test_points_pattern_matching_nothing_beside_a_valid_one(tmp_path):
    one_line_error(
        capture(tmp_path, "--points", "llm/layer00/out,llm/layr9*/out"), "'llm/layr9*/out'", "matches no capture point"
    )


def test_points_empty_selection(tmp_path):
    one_line_error(capture(tmp_path, "--points", " , "), "names no pattern")


# -- outputs and sizes --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", ["0", "-5MB", "0GB"])
def test_max_shard_size_must_be_positive(tmp_path, size):
    r = invoke("convert", CKPT, "--to", "safetensors", "-o", tmp_path / "hf", "--max-shard-size", size)
    one_line_error(r, "--max-shard-size must be > 0")
    assert not os.listdir(tmp_path)


def test_capture_output_suffix(tmp_path):
    r = invoke("capture", CKPT, "--inputs", INPUTS, "-o", tmp_path / "x.npz")
    one_line_error(r, "x.npz", ".safetensors", "'.npz'")
    r = generate("-o", tmp_path / "g.npz")
    one_line_error(r, "g.npz", ".safetensors")
    assert not os.listdir(tmp_path)


def test_output_directory_missing_refused_before_running(tmp_path):
    one_line_error(
        invoke("capture", CKPT, "--inputs", INPUTS, "-o", tmp_path / "no" / "c.safetensors"), "does not exist"
    )


def test_bad_set(tmp_path):
    one_line_error(capture(tmp_path, "--set", "position_origin=2"), "position_origin=2", "allowed")
    one_line_error(capture(tmp_path, "--set", "rope=1"), "'rope=1'", "position_origin, final_softcap")
    one_line_error(capture(tmp_path, "--set", "attn_softcap"), "NAME=VALUE")


def test_click_usage_errors_are_one_line():
    one_line_error(invoke("capture", CKPT, "--inputs", INPUTS), "Missing option '-o'")
    one_line_error(invoke("capture", CKPT, "--inputs", INPUTS, "-o", "x.safetensors", "--dtype", "int8"), "'int8'")
    one_line_error(invoke("convert", CKPT, "--nope"), "--nope")
    one_line_error(invoke("nosuchcommand"), "nosuchcommand")


# -- --json errors ------------------------------------------------------------------------------------------------
def test_json_errors_are_objects_on_stdout(tmp_path):
    inputs = dict(load_inputs(INPUTS))
    inputs.pop("mask_ar")
    bad = tmp_path / "bad.npz"
    np.savez(bad, **inputs)
    r = invoke("generate", CKPT, "--inputs", bad, "--max-new-tokens", "2", "--json")
    line = one_line_error(r, "mask_ar")
    err = json.loads(r.stdout)["error"]
    assert set(err) == {"kind", "message", "file", "key"}
    assert err["kind"] == "InputsError" and err["key"] == "mask_ar" and err["file"].endswith("bad.npz")
    assert line == f"error: {err['message']}"

    r = invoke("capture", CKPT, "--inputs", INPUTS, "-o", tmp_path / "x.npz", "--json")
    err = json.loads(r.stdout)["error"]
    assert r.exit_code == 2 and err["kind"] == "OutputError" and err["file"].endswith("x.npz")

    r = generate("--top-k", "0", "--json")
    err = json.loads(r.stdout)["error"]
    assert r.exit_code == 2 and err["kind"] == "UsageError" and "--top-k" in err["message"]
    assert err["file"] is None and err["key"] is None


def test_json_error_for_a_bad_checkpoint(tmp_path):
    p = tmp_path / "broken.npz"
    p.write_bytes(b"PK\x03\x04 not really a zip")
    r = invoke("inspect", p, "--json")
    assert r.exit_code == 2
    err = json.loads(r.stdout)["error"]
    assert err["kind"] == "CheckpointError" and err["file"].endswith("broken.npz")


# -- Ctrl-C -------------------------------------------------------------------------------------------------------
SLOW_FORWARD = """
import sys, time
import parity.torch_impl.api as api
def forward(*a, **k):
    print("forward started", file=sys.stderr, flush=True)
    time.sleep(60)  # stands for one long native op (the GIL released, no Python bytecode for a minute)
api.forward = forward
from parity.cli import main
main()
"""


def test_ctrl_c_exits_130_promptly_with_one_line(tmp_path):
    out = tmp_path / "c.safetensors"
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = signal_child.popen(  # SIGINT at its default disposition, whatever the suite inherited (nohup, a script's &)
        [sys.executable, "-c", SLOW_FORWARD, "capture", CKPT, "--inputs", INPUTS, "-o", str(out)],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        assert p.stderr.readline().strip() == "forward started"
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        rc = p.wait(timeout=20)
        elapsed = time.monotonic() - t0
    finally:
        p.kill()
    rest = p.stderr.read().strip().splitlines()
    assert rc == 130 and elapsed < 10, (rc, elapsed)
    assert rest == ["error: interrupted (Ctrl-C); nothing was written"], rest
    assert os.listdir(tmp_path) == []


def test_a_running_torch_forward_notices_cancellation():
    """The implementation checks between blocks: once cancelled, a forward stops at the next block."""
    from parity import monitor, spec
    from parity.config import TINY_VARIANTS
    from parity.conventions import PRESETS
    from parity.torch_impl import api

    cfg = TINY_VARIANTS["tiny-pg2-gqa"]
    model = api.build_model(cfg, PRESETS["big_vision"], params=spec.random_params(cfg))
    seen = []
    monitor.cancelled.clear()

    def cancel_after_three(unit):
        seen.append(unit)
        if len(seen) == 3:
            monitor.cancelled.set()

    try:
        with monitor.reporting(cancel_after_three), pytest.raises(monitor.Cancelled):
            api.forward(model, load_inputs(INPUTS))
    finally:
        monitor.cancelled.clear()
    assert len(seen) == 3  # stopped at the fourth block, not at the end


def test_interruptible_reraises_worker_errors():
    from parity.errors import InputsError
    from parity.run import interruptible

    def boom():
        raise InputsError("bad")

    with pytest.raises(InputsError, match="bad"):
        interruptible(boom)
    assert interruptible(lambda x: x + 1, 1) == 2
