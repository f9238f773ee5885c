"""The CLI is thin: JSON reports parse, exit codes mean what the README says."""

import json

import numpy as np
from click.testing import CliRunner

from parity import spec
from parity.cli import main
from parity.config import TINY_VARIANTS
from tests.ckpt_helpers import tiny_npz  # noqa: F401  (fixture)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_convert_and_inspect_json(tiny_npz, tmp_path):
    src, _ = tiny_npz("tiny-pg2-28b", "bfloat16")
    r = invoke("convert", src, "-o", tmp_path / "st", "--to", "safetensors", "--json")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["config"] == "tiny-pg2-28b" and rep["destination"]["format"] == "safetensors"
    assert rep["tensors"] == len(spec.hf_shapes(TINY_VARIANTS["tiny-pg2-28b"]))
    r = invoke("inspect", tmp_path / "st", "--json")
    assert r.exit_code == 0
    rep = json.loads(r.stdout)
    assert rep["conforms"] and rep["format"] == "safetensors" and rep["dtypes"] == ["bfloat16"]
    assert rep["config_fields"]["text"]["query_scale"] == "rsqrt_emb_per_head"


def test_inspect_exit_1_on_departures(tmp_path):
    cfg = TINY_VARIANTS["tiny-pg1-kn"]
    params = spec.random_params(cfg)
    params["llm/final_norm/scale"] = np.zeros(7, np.float32)
    np.savez(tmp_path / "x.npz", **{"params/" + k: v for k, v in params.items()})
    r = invoke("inspect", tmp_path / "x.npz", "--config", cfg.name, "--json")
    assert r.exit_code == 1
    deps = json.loads(r.stdout)["departures"]
    assert deps == [{"key": "llm/final_norm/scale", "expected": [48], "found": [7], "what": "wrong shape"}]
    r = invoke("inspect", tmp_path / "x.npz")  # unknown shapes: reported, not a crash
    assert r.exit_code == 1 and "departure" in r.stdout


def test_help_lists_commands():
    r = invoke("--help")
    assert r.exit_code == 0
    for cmd in ("convert", "inspect"):
        assert cmd in r.stdout
