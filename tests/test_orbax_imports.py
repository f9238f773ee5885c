"""The npz and safetensors paths never import jax, orbax or tensorstore: they work where those are not installed.
Checked in a fresh interpreter whose import system refuses them."""

import json
import os
import subprocess
import sys

from tests.ckpt_helpers import tiny_npz  # noqa: F401  (fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BLOCKER = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("jax", "jaxlib", "orbax", "tensorstore", "flax"):
            raise ImportError(f"blocked: {name}")
        return None
sys.meta_path.insert(0, Blocker())
"""


def run_blocked(code: str, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + code, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )


def test_npz_and_safetensors_work_without_jax_orbax_tensorstore(tiny_npz, tmp_path):
    src, _ = tiny_npz("tiny-pg2-gqa", "bfloat16")
    code = """
import json, sys
from click.testing import CliRunner
from parity.cli import main
src, st, back = sys.argv[1:4]
outs = []
for args in (["convert", src, "-o", st, "--to", "safetensors", "--json"], ["convert", st, "-o", back, "--to", "npz",
             "--json"], ["inspect", back, "--json"], ["inspect", st, "--json"]):
    r = CliRunner().invoke(main, args)
    outs.append([r.exit_code, r.stderr[-300:]])
from converters.checkpoint import load_checkpoint
load_checkpoint(back)
print(json.dumps({"runs": outs, "loaded": sorted(m for m in sys.modules
                                                 if m.split(".")[0] in ("jax", "orbax", "tensorstore"))}))
"""
    p = run_blocked(code, src, tmp_path / "st", tmp_path / "back.npz")
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert all(c == 0 for c, _ in res["runs"]), res["runs"]
    assert res["loaded"] == []


def test_orbax_path_without_tensorstore_is_one_line_error(tiny_npz, tmp_path):
    src, _ = tiny_npz()
    code = """
import sys
from click.testing import CliRunner
from parity.cli import main
r = CliRunner().invoke(main, ["convert", sys.argv[1], "-o", sys.argv[2], "--to", "orbax"])
print(r.exit_code); print(r.stderr.strip())
"""
    p = run_blocked(code, src, tmp_path / "ob")
    assert p.returncode == 0, p.stderr[-2000:]
    exit_code, err = p.stdout.strip().split("\n", 1)
    assert exit_code == "2" and "tensorstore" in err and "\n" not in err.strip()
    assert not os.path.exists(tmp_path / "ob") and os.listdir(tmp_path) == [os.path.basename(src)]
