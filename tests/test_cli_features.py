"""What a demanding user expects of the CLI beyond errors: points listing, --set, defaults in --help, structured
JSON fields, timings, generate -o, progress that fits 80 columns, the CPU half-precision warning and
--compute-dtype, the demo's output folder, the benchmark's statistics."""

import io
import json
import os
import re
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

from parity import points as pts
from parity import spec
from parity.cli import main, progress_bar, stage_progress
from parity.config import TINY_VARIANTS
from parity.conventions import PRESETS
from parity.inputs import load_inputs
from parity.run import read_capture
from tests.ckpt_helpers import tiny_npz  # noqa: F401  (fixture)

GOLDEN = os.path.join(os.path.dirname(__file__), "..", "golden")
CKPT = os.path.join(GOLDEN, "tiny-pg2-gqa.b16.npz")
INPUTS = os.path.join(GOLDEN, "tiny-inputs.npz")
TOKENIZER = os.path.join(GOLDEN, "tokenizer.model")
CFG = TINY_VARIANTS["tiny-pg2-gqa"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok_json(r):
    assert r.exit_code == 0, (r.stderr, r.exception)
    return json.loads(r.stdout)


# -- parity points ------------------------------------------------------------------------------------------------
def test_points_lists_every_point_with_the_shape_a_capture_has(tmp_path):
    rep = ok_json(invoke("points", CKPT, "--inputs", INPUTS, "--json"))
    assert rep["config"] == "tiny-pg2-gqa"
    listed = {p["name"]: p["shape"] for p in rep["points"] if p["when"] == "forward"}
    assert list(listed) == pts.forward_points(CFG)
    assert [p["name"] for p in rep["points"] if p["when"] == "generate"] == pts.cache_points(CFG)
    out = tmp_path / "all.safetensors"
    assert invoke("capture", CKPT, "--inputs", INPUTS, "-o", out).exit_code == 0
    tensors, _ = read_capture(str(out))
    assert {k: list(v.shape) for k, v in tensors.items()} == listed


def test_points_symbolic_and_by_variant_name():
    r = invoke("points", "paligemma2-3b-224")
    assert r.exit_code == 0, r.stderr
    assert "llm/layer25/out" in r.stdout and "[B, 256+L, 2304]" in r.stdout and "[B, 256+L, 257152]" in r.stdout
    rep = ok_json(invoke("points", CKPT, "--max-new-tokens", "4", "--json"))
    cache = next(p for p in rep["points"] if p["name"] == "llm/layer00/k_cache")
    assert cache["shape"] == ["B", "16+L+4", CFG.text.num_kv_heads, CFG.text.head_dim]
    r = invoke("points", "no-such-variant")
    assert r.exit_code == 2 and "neither a checkpoint nor a variant name" in r.stderr


# -- --set and conventions in every report -------------------------------------------------------------------------
def test_set_toggles_conventions_one_at_a_time(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    rep = ok_json(
        invoke(
            "capture",
            CKPT,
            "--inputs",
            INPUTS,
            "-o",
            a,
            "--points",
            "logits",
            "--json",
            "--set",
            "position_origin=1",
            "--set",
            "final_softcap=always",
            "--set",
            "sliding_window=transformers",
            "--set",
            "loss_normalization=per_token",
        )
    )
    assert rep["conventions"] == PRESETS["transformers"].to_dict()
    ok_json(
        invoke(
            "capture", CKPT, "--inputs", INPUTS, "-o", b, "--points", "logits", "--json", "--convention", "transformers"
        )
    )
    (ta, _), (tb, _) = read_capture(str(a)), read_capture(str(b))
    assert ta["logits"].tobytes() == tb["logits"].tobytes()
    g = ok_json(
        invoke("generate", CKPT, "--inputs", INPUTS, "--max-new-tokens", "2", "--json", "--set", "attn_softcap=off")
    )
    assert g["manifest"]["conventions"] == {**PRESETS["big_vision"].to_dict(), "attn_softcap": False}


def test_set_changes_the_numbers(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    invoke("capture", CKPT, "--inputs", INPUTS, "-o", a, "--points", "logits")
    invoke("capture", CKPT, "--inputs", INPUTS, "-o", b, "--points", "logits", "--set", "position_origin=1")
    (ta, _), (tb, _) = read_capture(str(a)), read_capture(str(b))
    assert not np.array_equal(ta["logits"], tb["logits"])


# -- --help shows every default ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cmd, defaults",
    [
        (
            "capture",
            [
                "[default: torch]",
                "[default: big_vision]",
                "[default: float32]",
                "[default: cpu]",
                "[default: all]",
                "[default: --dtype]",
            ],
        ),
        (
            "generate",
            ["[default: 1.0 when sampling]", "[default: 0;", "[default: greedy]", "[default: cpu]", "[default: off]"],
        ),
        ("convert", ["[default: keep]", "[default: one file]"]),
    ],
)
def test_help_shows_defaults(cmd, defaults):
    r = invoke(cmd, "--help")
    assert r.exit_code == 0
    text = " ".join(r.stdout.split())
    for d in defaults:
        assert d in text, (cmd, d)


# -- structured JSON fields ----------------------------------------------------------------------------------------
def test_convert_reports_lossy_as_fields(tmp_path):
    there = ok_json(invoke("convert", CKPT, "--to", "safetensors", "-o", tmp_path / "hf", "--json"))
    assert there["lossy"] is False and there["lossy_steps"] == []
    back = ok_json(invoke("convert", tmp_path / "hf", "--to", "npz", "-o", tmp_path / "b.npz", "--json"))
    assert back["lossy"] is True and len(back["lossy_steps"]) == 1 and "padding rows" in back["lossy_steps"][0]
    f32 = ok_json(invoke("convert", CKPT, "--to", "npz", "-o", tmp_path / "f.npz", "--dtype", "float32", "--json"))
    assert f32["lossy"] is False  # widening
    f16 = ok_json(
        invoke("convert", tmp_path / "f.npz", "--to", "npz", "-o", tmp_path / "h.npz", "--dtype", "float16", "--json")
    )
    assert f16["lossy"] is True and "float16" in f16["lossy_steps"][0]


def test_inspect_explains_vocabulary_padding(tmp_path):
    npz = ok_json(invoke("inspect", CKPT, "--json"))
    assert npz["vocab_padding_parameters"] == 0 and npz["parameters"] == npz["spec_parameters"]
    invoke("convert", CKPT, "--to", "safetensors", "-o", tmp_path / "hf")
    st = ok_json(invoke("inspect", tmp_path / "hf", "--json"))
    assert st["vocab_padding_parameters"] == (CFG.hf_vocab_rows - CFG.text.vocab_size) * CFG.text.width
    assert st["parameters"] - st["spec_parameters"] == st["vocab_padding_parameters"]
    assert "vocabulary padding" in invoke("inspect", tmp_path / "hf").stdout


def test_inputs_reports_text_like_the_other_keys(tmp_path):
    from PIL import Image

    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(img)
    rep = ok_json(
        invoke(
            "inputs",
            img,
            "--prefix",
            "caption en",
            "--tokenizer",
            TOKENIZER,
            "--config",
            "tiny-pg2-gqa",
            "-o",
            tmp_path / "in.npz",
            "--json",
        )
    )
    saved = load_inputs(tmp_path / "in.npz")
    for k, v in saved.items():
        assert rep[k] == {"dtype": str(v.dtype), "shape": list(v.shape)}, k
    assert rep["tokens"] == saved["text"].tolist()


def test_capture_lists_shape_and_dtype_of_each_point_and_splits_times(tmp_path):
    rep = ok_json(
        invoke(
            "capture", CKPT, "--inputs", INPUTS, "-o", tmp_path / "c.safetensors", "--points", "img/projector", "--json"
        )
    )
    tensors, manifest = read_capture(rep["output"])
    assert rep["tensors"] == {k: {"shape": list(v.shape), "dtype": "float32"} for k, v in tensors.items()}
    assert manifest["tensors"] == rep["tensors"]
    assert rep["load_seconds"] > 0 and rep["run_seconds"] > 0
    # each figure is rounded to 1 ms on its own, so the sum may exceed the total by up to 1.5 ms of rounding
    assert rep["seconds"] >= rep["load_seconds"] + rep["run_seconds"] - 0.0015


# -- generate -o ---------------------------------------------------------------------------------------------------
def test_generate_saves_tokens_and_step_logits(tmp_path):
    out = tmp_path / "g.safetensors"
    rep = ok_json(invoke("generate", CKPT, "--inputs", INPUTS, "--max-new-tokens", "5", "-o", out, "--json"))
    tensors, manifest = read_capture(str(out))
    tokens, logits = tensors["tokens"], tensors["logits"]
    assert tokens.dtype == np.int32 and logits.dtype == np.float32
    assert logits.shape == (2, 5, CFG.text.vocab_size)
    for row in rep["rows"]:
        n = len(row["tokens"])
        assert tokens[row["row"], :n].tolist() == row["tokens"]
        # greedy: every saved step's logits pick the token generated at that step
        assert logits[row["row"], :n].argmax(-1).tolist() == row["tokens"]
    assert manifest["sampling"]["greedy"] is True and manifest["checkpoint"] == rep["manifest"]["checkpoint"]
    assert rep["manifest"]["output"] == str(out)
    r = invoke("generate", CKPT, "--inputs", INPUTS, "--max-new-tokens", "5", "-o", out)
    assert r.exit_code == 2 and "--overwrite" in r.stderr


# -- progress ------------------------------------------------------------------------------------------------------
def _rendered_lines(buf: str) -> list[str]:
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "\n", buf)
    return [ln for ln in re.split(r"[\r\n]", text) if ln.strip()]


def test_convert_bar_fits_80_columns():
    from rich.console import Console

    buf = io.StringIO()
    con = Console(file=buf, width=80, force_terminal=True, color_system=None)
    with progress_bar(True, "converting", console=con) as cb:
        for i in range(1, 4):
            cb(i * 2_000_000_000, 6_000_000_000, "llm/layers/attn/q_einsum/w" + "/very_long_key_name" * 4)
    lines = _rendered_lines(buf.getvalue())
    assert any("converting" in ln for ln in lines)
    assert max(len(ln) for ln in lines) <= 80, max(lines, key=len)


def test_run_progress_shows_each_stage_within_80_columns():
    from rich.console import Console

    buf = io.StringIO()
    con = Console(file=buf, width=80, force_terminal=True, color_system=None)
    with stage_progress(True, console=con) as cb:
        cb("loading", 3_000_000, 6_000_000_000)
        con.file.write("\n")
        cb("forward", 12, 53)
        cb("decoding", 7, 32)
    lines = _rendered_lines(buf.getvalue())
    assert max(len(ln) for ln in lines) <= 80


def test_library_reports_loading_forward_and_decoding():
    from parity.run import generate

    seen = []
    generate(CKPT, INPUTS, 4, progress=lambda stage, done, total: seen.append((stage, done, total)))
    stages = [s for s, _, _ in seen]
    assert stages[0] == "loading" and "building" in stages and "forward" in stages and "decoding" in stages
    loading = [(d, t) for s, d, t in seen if s == "loading"]
    total = sum(int(np.prod(e.shape)) * 2 for e in spec.entries(CFG))  # bf16 file
    assert loading[-1] == (total, total)
    assert max(d for s, d, _ in seen if s == "forward") == CFG.vision.depth + CFG.text.depth
    decoding = [d for s, d, _ in seen if s == "decoding"]
    assert decoding == list(range(1, len(decoding) + 1)) and 1 <= len(decoding) <= 4


# -- half precision on CPU -----------------------------------------------------------------------------------------
def test_warns_before_slow_half_precision_on_cpu(tmp_path, monkeypatch):
    from parity.torch_impl import api

    speeds = {"bfloat16": 0.2, "float16": 0.3, "float32": 97.0}
    monkeypatch.setattr(api, "matmul_gflops", lambda dtype, device="cpu", **k: speeds[dtype])
    r = invoke(
        "capture",
        CKPT,
        "--inputs",
        INPUTS,
        "-o",
        tmp_path / "c.safetensors",
        "--dtype",
        "bfloat16",
        "--points",
        "logits",
        "--json",
    )
    assert r.exit_code == 0, r.stderr
    warning = r.stderr.strip().splitlines()[0]
    assert warning.startswith("warning: bfloat16 matmuls on this CPU run 485x slower") and "--compute-dtype" in warning
    assert json.loads(r.stdout)["warnings"] == [warning[len("warning: ") :]]
    r = invoke(
        "capture",
        CKPT,
        "--inputs",
        INPUTS,
        "-o",
        tmp_path / "d.safetensors",
        "--dtype",
        "bfloat16",
        "--compute-dtype",
        "float32",
        "--points",
        "logits",
    )
    assert r.exit_code == 0 and "warning" not in r.stderr
    monkeypatch.setattr(api, "matmul_gflops", lambda dtype, device="cpu", **k: 100.0)
    assert api.speed_warning("bfloat16", "cpu") is None


def test_compute_dtype_keeps_bf16_values_computes_in_float32(tmp_path):
    from parity.torch_impl import api

    out = tmp_path / "c.safetensors"
    rep = ok_json(
        invoke(
            "capture",
            CKPT,
            "--inputs",
            INPUTS,
            "-o",
            out,
            "--points",
            "logits",
            "--json",
            "--dtype",
            "bfloat16",
            "--compute-dtype",
            "float32",
        )
    )
    assert rep["dtype"] == "bfloat16" and rep["compute_dtype"] == "float32"
    got = read_capture(str(out))[0]["logits"]
    # the stored bf16 values, widened exactly, in a float32 model
    from converters.checkpoint import load_checkpoint

    _, stored = load_checkpoint(CKPT)
    params = {k: np.asarray(v).astype(np.float32) for k, v in stored.items()}
    model = api.build_model(CFG, PRESETS["big_vision"], dtype="float32", params=params)
    want = api.forward(model, load_inputs(INPUTS, CFG))["logits"]
    np.testing.assert_array_equal(got, want)
    bf16 = ok_json(
        invoke(
            "capture",
            CKPT,
            "--inputs",
            INPUTS,
            "-o",
            tmp_path / "b.safetensors",
            "--points",
            "logits",
            "--json",
            "--dtype",
            "bfloat16",
        )
    )
    assert not np.array_equal(read_capture(bf16["output"])[0]["logits"], got)


def test_compute_dtype_rounds_float32_parameters(tmp_path, tiny_npz):
    from parity.torch_impl import api

    src, params = tiny_npz("tiny-pg2-gqa", "float32")
    out = tmp_path / "c.safetensors"
    assert (
        invoke(
            "capture",
            src,
            "--inputs",
            INPUTS,
            "-o",
            out,
            "--points",
            "logits",
            "--dtype",
            "bfloat16",
            "--compute-dtype",
            "float32",
        ).exit_code
        == 0
    )
    rounded = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in params.items()}
    model = api.build_model(CFG, PRESETS["big_vision"], params=rounded)
    np.testing.assert_array_equal(
        read_capture(str(out))[0]["logits"], api.forward(model, load_inputs(INPUTS, CFG))["logits"]
    )


# -- the demo ------------------------------------------------------------------------------------------------------
def test_demo_leaves_its_outputs_in_out_demo(tmp_path):
    wrapper = tmp_path / "parity"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} -m parity.cli "$@"\n')
    wrapper.chmod(0o755)
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    r = subprocess.run(
        ["bash", os.path.join(ROOT, "golden", "demo.sh"), str(wrapper)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    made = set(os.listdir(os.path.join(ROOT, "out", "demo")))
    assert {"hf", "back.b16.npz", "capture.safetensors", "generation.safetensors"} <= made
    assert "out/demo/" in r.stdout


# -- benchmark statistics ------------------------------------------------------------------------------------------
def test_benchmark_ratio_summary_and_no_nan():
    sys.path.insert(0, ROOT)
    from benchmarks.torch_forward import ratio_summary, table

    assert ratio_summary([0.9, 0.95, 0.92, 0.97])["verdict"] == "faster"
    assert ratio_summary([1.1, 1.2, 1.05])["verdict"] == "slower"
    wide = ratio_summary([0.5, 12.19, 1.25, 0.8, 1.1])
    assert wide["verdict"] == "inconclusive" and wide["median"] == 1.1
    row = {
        "batch": 4,
        "prefill_ours_s": 0.1,
        "prefill_hf_s": 0.11,
        "prefill_ratio": ratio_summary([0.9, 0.91]),
        "generate_ours_s": 1.0,
        "generate_hf_s": 1.1,
        "generate_ratio": ratio_summary([0.5, 1.5]),
        "decode_tok_s_ours": None,
        "decode_tok_s_hf": 20.0,
        "decode_ratio": None,
        "decode_path": "eager",
        "tokens_agree": True,
    }
    text = table(
        {
            "config": "c",
            "device": "cpu",
            "dtype": "f32",
            "prompt_tokens": 82,
            "new_tokens": 8,
            "repeat": 2,
            "rows": [row],
        }
    )
    assert "nan" not in text.lower() and "unmeasured" in text and "inconclusive" in text and "faster" in text
    assert "NaN" not in json.dumps(row)


def test_the_command_keeps_jax_compilations_in_a_persistent_cache_unless_told_not_to(tmp_path):
    """`parity ... --impl jax` compiles once per machine (XDG cache), records the cache in the manifest, and leaves
    jax's own setting alone (here: empty = off)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    cmd = [
        sys.executable,
        "-m",
        "parity.cli",
        "capture",
        CKPT,
        "--inputs",
        INPUTS,
        "--impl",
        "jax",
        "--points",
        "logits",
        "--json",
    ]

    def run(extra_env, out):
        r = subprocess.run(
            cmd + ["-o", str(out)],
            env={**env, "XDG_CACHE_HOME": str(tmp_path / "xdg"), **extra_env},
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert r.returncode == 0, r.stderr
        return read_capture(str(out))[1]

    cache = tmp_path / "xdg" / "parity" / "jax-compile"
    assert run({}, tmp_path / "a.safetensors")["compile_cache"] == str(cache)
    assert any(f.name.startswith("jit__forward") for f in cache.iterdir())
    assert run({"JAX_COMPILATION_CACHE_DIR": ""}, tmp_path / "b.safetensors")["compile_cache"] is None
