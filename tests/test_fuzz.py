"""Seeded mutation fuzzing of every file parser, through the CLI as a user runs it.

For each format a valid file is mutated (bytes: bit flips, interesting integers at structure fields, insertions,
deletions, truncation, appended junk; JSON: type confusions, out-of-range numbers, structure changes, duplicate keys,
deep nesting) and given to the command that reads it. Every run must end, within a time bound, in exactly one of:

- exit 0, with output equal to what the unmutated input gives; when the mutation changed what the reference reader
  (np.load, the safetensors library) reads, equal instead to the output for exactly what that reader reads, so a
  file we accept means what it means to the reference (a relabelled tensor can never pass as other values);
- exit 2 with one line on stderr, no traceback, nothing left at the output.

Whatever the reference reader refuses, we refuse too. Cases per format are scaled by PARITY_FUZZ_SCALE (default 1,
a few hundred in all); the seed is PARITY_FUZZ_SEED. The figures are printed with `pytest -s`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import sys
import time
import zlib
from collections import Counter

import numpy as np
import pytest
from click.testing import CliRunner

from parity import spec
from parity.cli import main
from parity.config import TINY_VARIANTS
from tests import hostile_files as hf

SEED = int(os.environ.get("PARITY_FUZZ_SEED", "10"))
SCALE = float(os.environ.get("PARITY_FUZZ_SCALE", "1"))
TIME_BOUND = 10.0  # seconds per run; the tiny inputs take ~0.05 s
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLD_CKPT = os.path.join(ROOT, "golden", "tiny-pg1-mqa.npz")
GOLD_INPUTS = os.path.join(ROOT, "golden", "tiny-inputs.npz")
CASES = {
    "npz": 80,
    "safetensors": 80,
    "index": 30,
    "config": 40,
    "sidecar": 20,
    "inputs-npz": 30,
    "inputs-npz-compressed": 20,
    "inputs-safetensors": 30,
    "capture": 40,
}
FIGURES: dict[str, Counter] = {}


# -- the mutators --------------------------------------------------------------------------------------------------
INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]


def mutate_bytes(rng: random.Random, data: bytes, hot: list[tuple[int, int]]) -> tuple[bytes, str]:
    """One to three mutations, mostly inside `hot` ranges (headers, directories) where structure lives."""
    d = bytearray(data)
    what = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        if hot and rng.random() < 0.8:
            a, b = rng.choice(hot)
            pos = rng.randrange(a, max(a + 1, min(b, len(d))))
        else:
            pos = rng.randrange(len(d))
        pos = min(pos, max(0, len(d) - 1))
        op = rng.choice(["bit", "byte", "int16", "int32", "insert", "delete", "truncate", "append", "dup"])
        if op == "bit":
            d[pos] ^= 1 << rng.randrange(8)
        elif op == "byte":
            d[pos] = rng.choice([0, 0xFF, 0x20, 0x7B, 0x22, rng.randrange(256)])
        elif op in ("int16", "int32"):
            fmt, n = ("<H", 2) if op == "int16" else ("<I", 4)
            v = rng.choice(INTERESTING + [len(d), len(d) - pos, rng.randrange(1 << (8 * n))]) % (1 << (8 * n))
            if pos + n <= len(d):
                struct.pack_into(fmt, d, pos, v)
        elif op == "insert":
            d[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.choice([1, 4, 7, 64])))
        elif op == "delete":
            del d[pos : pos + rng.choice([1, 4, 7, 64])]
        elif op == "truncate":
            del d[pos:]
        elif op == "append":
            d += bytes(rng.randrange(256) for _ in range(rng.choice([1, 8, 100])))
        else:
            n = rng.choice([4, 30, 46])
            d[pos:pos] = d[pos : pos + n]
        what.append(f"{op}@{pos}")
        if not d:
            d = bytearray(b"\0")
    return bytes(d), " ".join(what)


def json_paths(x, path=()):
    yield path
    if isinstance(x, dict):
        for k, v in x.items():
            yield from json_paths(v, path + (k,))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from json_paths(v, path + (i,))


def get(x, path):
    for p in path:
        x = x[p]
    return x


def set_at(x, path, v):
    if not path:
        return v
    get(x, path[:-1])[path[-1]] = v
    return x


# Never valid for any field a reader of ours takes (sizes are positive integers, eps/theta/softcaps positive
# numbers, names strings, sub-configs objects): a config mutated with these must be refused, or mean the same.
INVALID_FOR_CONFIG = ["x", "48", "", [], [48], {}, {"a": 1}, True, False, -1, 0, -0.5, -(2**64), -1e300]
ANY_JSON = INVALID_FOR_CONFIG + [
    None,
    1,
    2,
    7,
    16,
    1.5,
    1e-6,
    2**64,
    1e301,
    "F16",
    "BF16",
    "F32",
    "I32",
    "F8_E4M3",
    [0, 0],
]


def mutate_json(rng: random.Random, obj, values: list, structural: bool = True, free: tuple = ()) -> tuple[bytes, str]:
    """A JSON document mutated at a random path (not one of the `free`-form ones, whose every string is valid): a
    value replaced, wrapped, swapped, off by a little, keys duplicated, deep nesting, truncation; returns the
    serialised text (which may be deliberately invalid JSON)."""
    obj = json.loads(json.dumps(obj))
    paths = [p for p in json_paths(obj) if p not in free]
    path = rng.choice(paths)
    op = rng.choice(
        ["replace"] * 6
        + (
            ["wrap", "swap", "nest", "dupkey", "truncate", "number"]
            if structural
            else ["wrap", "nest", "dupkey", "truncate"]
        )
    )
    desc = f"{op} at {'/'.join(map(str, path)) or '<root>'}"
    if op == "replace":
        v = rng.choice(values)
        obj = set_at(obj, path, v)
        desc += f" = {v!r}"[:60]
    elif op == "wrap":
        obj = set_at(obj, path, [get(obj, path)])
    elif op == "swap":
        other = rng.choice(paths)
        a, b = get(obj, path), get(obj, other)
        if path and other and not (path[: len(other)] == other or other[: len(path)] == path):
            obj = set_at(obj, path, b)
            obj = set_at(obj, other, a)
            desc += f" with {'/'.join(map(str, other))}"
    elif op == "number":  # a nearby integer: shapes, offsets, sizes off by a little
        v = get(obj, path)
        if type(v) is int:
            obj = set_at(obj, path, v + rng.choice([-8, -4, -2, -1, 1, 2, 4, 8, v]))
    elif op == "nest":
        text = json.dumps(obj)
        depth = rng.choice([50, 5000, 100000])
        return (
            text[:-1] + (", " if len(text) > 2 else "") + '"deep": ' + "[" * depth + "]" * depth + "}"
        ).encode(), desc + f" {depth}"
    elif op == "dupkey":
        parent = get(obj, path[:-1]) if path else obj
        if isinstance(parent, dict) and path:
            text = json.dumps(obj)
            k = json.dumps(path[-1])
            i = text.find(k + ":")
            if i >= 0:
                return (text[:i] + k + ": " + json.dumps(rng.choice(values)) + ", " + text[i:]).encode(), desc
    elif op == "truncate":
        text = json.dumps(obj)
        return text[: rng.randrange(1, len(text))].encode(), desc
    return json.dumps(obj).encode(), desc


# -- running one case ------------------------------------------------------------------------------------------
class Hang(Exception):
    pass


def _alarm(*_):
    raise Hang()


def run_cli(args) -> tuple[int, str, float]:
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, TIME_BOUND)
    t0 = time.perf_counter()
    try:
        r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    dt = time.perf_counter() - t0
    if isinstance(r.exception, Hang):
        raise AssertionError(f"hang: {args} did not finish within {TIME_BOUND} s")
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        import traceback

        tb = "".join(traceback.format_exception(type(r.exception), r.exception, r.exception.__traceback__))
        raise AssertionError(f"traceback (exit {r.exit_code}) for {args}:\n{tb}")
    return r.exit_code, r.stderr, dt


def files(d) -> dict[str, bytes]:
    out = {}
    for base, _, names in os.walk(d):
        for n in names:
            p = os.path.join(base, n)
            out[os.path.relpath(p, d)] = open(p, "rb").read()
    return out


@pytest.fixture(scope="module")
def unraisable():
    """Count exceptions Python could only print (ZipFile.__del__ after an error, and the like): there must be none."""
    seen = []
    old = sys.unraisablehook
    sys.unraisablehook = lambda u: seen.append(f"{u.exc_type.__name__}: {u.exc_value} in {u.object!r}")
    yield seen
    sys.unraisablehook = old


def check(name: str, case: str, code: int, err: str, dt: float, out_dir, ok_output) -> str:
    """The property for one run; returns its outcome label."""
    assert dt < TIME_BOUND, (name, case, dt)
    left = sorted(os.listdir(out_dir))
    if code == 2:
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, (name, case, err)
        assert left == [], (name, case, "left behind", left)
        return "exit 2, one line"
    assert code == 0, (name, case, code, err)
    verdict = ok_output()
    assert verdict, (name, case, "exit 0 with output different from the unmutated input's and the reference's")
    return verdict


def note(name, case, label, err=""):
    """PARITY_FUZZ_VERBOSE=1 prints every case whose outcome is not plainly 'refused' or 'same output'."""
    if os.environ.get("PARITY_FUZZ_VERBOSE") and ("(" in label or "reads" in label):
        print(f"  {name} {case}: {label} {err.strip()[:300]}")


def figures(name, outcomes: Counter, seconds: float):
    FIGURES[name] = outcomes
    print(
        f"\nfuzz {name}: {sum(outcomes.values())} cases in {seconds:.1f} s: "
        + ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items()))
    )


def n_cases(name):
    return max(1, int(CASES[name] * SCALE))


# -- checkpoints ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    cfg = TINY_VARIANTS["tiny-pg2-gqa"]
    params = spec.random_params(cfg, seed=3)
    np.savez(d / "ref.npz", **{spec.NPZ_PREFIX + k: v for k, v in params.items()})
    from converters.convert import convert

    convert(d / "ref.npz", d / "ref-st", "safetensors")
    convert(d / "ref.npz", d / "ref-sharded", "safetensors", max_shard_size="30KB")
    return d


def _outdir(work, name):
    o = work / f"out-{name}"
    if o.exists():
        shutil.rmtree(o)
    o.mkdir()
    return o


def _npz_hot(data: bytes) -> list[tuple[int, int]]:
    hot = [(len(data) - 22, len(data))]
    for r in hf.central_records(data):
        hot.append((r["pos"], r["end"]))
        hot.append((r["offset"], hf.member_data(data, r["name"]) + 128))
    return hot


def _reference_npz(path):
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception:
        return None


def _reference_st(path):
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception:
        return None


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes() for k in a
    )


def test_fuzz_npz_checkpoint(work, unraisable):
    """npz -> safetensors, against np.load."""
    rng = random.Random(SEED * 1000 + 1)
    ref = work / "ref.npz"
    data = ref.read_bytes()
    original = _reference_npz(ref)
    out = _outdir(work, "npz")
    assert run_cli(["convert", ref, "-o", out / "base", "--to", "safetensors"])[0] == 0
    baseline = files(out / "base")
    shutil.rmtree(out / "base")
    hot, outcomes, t0 = _npz_hot(data), Counter(), time.perf_counter()
    src = work / "m.npz"
    for i in range(n_cases("npz")):
        m, desc = mutate_bytes(rng, data, hot)
        src.write_bytes(m)
        reference = _reference_npz(src)
        code, err, dt = run_cli(["convert", src, "-o", out / "x", "--to", "safetensors"])

        def ok():
            got = files(out / "x")
            shutil.rmtree(out / "x")
            if reference is None:
                return None  # we accepted what np.load refuses
            if _same(reference, original):
                return "exit 0, same output" if got == baseline else None
            clean = work / "clean.npz"
            np.savez(clean, **reference)
            o2 = _outdir(work, "npz-clean")
            assert run_cli(["convert", clean, "-o", o2 / "x", "--to", "safetensors"])[0] == 0
            return "exit 0, what np.load reads" if files(o2 / "x") == got else None

        label = check("npz", f"case {i}: {desc}", code, err, dt, out, ok)
        if code == 2 and reference is not None:
            label += " (np.load accepts)"
        note("npz", f"case {i}: {desc}", label, err)
        outcomes[label] += 1
    figures("npz checkpoint -> safetensors", outcomes, time.perf_counter() - t0)
    assert not unraisable, unraisable


def _st_convert_case(work, name, src_dir, out, baseline, reference, original_st):
    code, err, dt = run_cli(["convert", src_dir, "-o", out / "x.npz", "--to", "npz"])

    def ok():
        got = files(out)
        for f in os.listdir(out):
            os.remove(out / f)
        if reference is None:
            return None
        if _same(reference, original_st):
            return "exit 0, same output" if got == baseline else None
        clean = work / "clean-st"
        shutil.rmtree(clean, ignore_errors=True)
        clean.mkdir()
        from safetensors.numpy import save_file

        save_file(reference, str(clean / "model.safetensors"))
        shutil.copy(src_dir / "config.json", clean / "config.json")
        o2 = _outdir(work, "st-clean")
        assert run_cli(["convert", clean, "-o", o2 / "x.npz", "--to", "npz"])[0] == 0
        return "exit 0, what safetensors reads" if files(o2) == got else None

    return code, err, dt, ok


def test_fuzz_safetensors_checkpoint(work, unraisable):
    """safetensors -> npz, against the safetensors library: bytes of the header and JSON-level header mutations."""
    rng = random.Random(SEED * 1000 + 2)
    ref = work / "ref-st"
    data = (ref / "model.safetensors").read_bytes()
    original = _reference_st(ref / "model.safetensors")
    (n,) = struct.unpack_from("<Q", data)
    header, body = hf.st_split(data)
    out = _outdir(work, "st")
    assert run_cli(["convert", ref, "-o", out / "x.npz", "--to", "npz"])[0] == 0
    baseline = files(out)
    for f in os.listdir(out):
        os.remove(out / f)
    src = work / "m-st"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(ref, src)
    outcomes, t0 = Counter(), time.perf_counter()
    for i in range(n_cases("safetensors")):
        if i % 2:
            m, desc = mutate_bytes(rng, data, [(0, 8 + n)])
        else:
            h, desc = mutate_json(rng, header, ANY_JSON)
            m = struct.pack("<Q", len(h)) + h + body
        (src / "model.safetensors").write_bytes(m)
        reference = _reference_st(src / "model.safetensors")
        code, err, dt, ok = _st_convert_case(work, "safetensors", src, out, baseline, reference, original)
        label = check("safetensors", f"case {i}: {desc}", code, err, dt, out, ok)
        if code == 2 and reference is not None:
            label += " (safetensors accepts)"
        note("safetensors", f"case {i}: {desc}", label, err)
        outcomes[label] += 1
    figures("safetensors checkpoint -> npz", outcomes, time.perf_counter() - t0)
    assert not unraisable, unraisable


def _json_target(work, name, ref_dir, rel, values, structural, out_name, to, n, make_baseline_src=None, free=()):
    rng = random.Random(SEED * 1000 + zlib.crc32(name.encode()) % 997)  # str hash() varies per process
    src = work / f"m-{name}"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(ref_dir, src)
    doc = json.loads((ref_dir / rel).read_text())
    if make_baseline_src:
        doc = make_baseline_src(doc)
        (src / rel).write_text(json.dumps(doc))
    out = _outdir(work, name)
    arg = src / out_name if out_name else src
    assert run_cli(["convert", arg, "-o", out / "x", "--to", to])[0] == 0, name
    baseline = files(out)
    shutil.rmtree(out)
    out.mkdir()
    outcomes, t0 = Counter(), time.perf_counter()
    for i in range(n):
        text, desc = mutate_json(rng, doc, values, structural, free)
        (src / rel).write_bytes(text)
        code, err, dt = run_cli(["convert", arg, "-o", out / "x", "--to", to])

        def ok():
            got = files(out)
            shutil.rmtree(out)
            out.mkdir()
            return "exit 0, same output" if got == baseline else None

        outcomes[check(name, f"case {i}: {desc}", code, err, dt, out, ok)] += 1
    return outcomes, time.perf_counter() - t0


def test_fuzz_index_json(work, unraisable):
    """A sharded checkpoint's model.safetensors.index.json: exit 0 only for the same output."""
    outcomes, s = _json_target(
        work,
        "index",
        work / "ref-sharded",
        "model.safetensors.index.json",
        ANY_JSON + ["model-00001-of-00002.safetensors", "../x", "model.safetensors"],
        True,
        None,
        "npz",
        n_cases("index"),
    )
    figures("index.json (sharded safetensors -> npz)", outcomes, s)
    assert not unraisable, unraisable


def test_fuzz_config_json(work, unraisable):
    """A hub-style config.json (no parity_config) mutated with values no field accepts: refused, or ignored where
    the field is not one we read (then the output is the same)."""

    def hub_style(doc):
        doc = dict(doc)
        del doc["parity_config"]
        return doc

    outcomes, s = _json_target(
        work,
        "config",
        work / "ref-st",
        "config.json",
        INVALID_FOR_CONFIG,
        False,
        None,
        "npz",
        n_cases("config"),
        hub_style,
    )
    figures("config.json (safetensors -> npz)", outcomes, s)
    assert not unraisable, unraisable


def test_fuzz_sidecar(work, unraisable):
    """The npz sidecar (our own config JSON) mutated with values no field accepts."""
    d = work / "side"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    shutil.copy(work / "ref.npz", d / "c.npz")
    (d / "c.npz.parity.json").write_text(TINY_VARIANTS["tiny-pg2-gqa"].to_json())
    outcomes, s = _json_target(
        work,
        "sidecar",
        d,
        "c.npz.parity.json",
        INVALID_FOR_CONFIG,
        False,
        "c.npz",
        "safetensors",
        n_cases("sidecar"),
        free=(("name",),),
    )
    figures("npz sidecar (npz -> safetensors)", outcomes, s)
    assert not unraisable, unraisable


# -- inputs and captures -------------------------------------------------------------------------------------------
def _validated_sha(arrays):
    from parity.inputs import inputs_sha256, validate_inputs

    try:
        return inputs_sha256(validate_inputs(arrays, TINY_VARIANTS["tiny-pg1-mqa"]))
    except Exception:
        return None


@pytest.mark.parametrize("fmt", ["npz", "npz-compressed", "safetensors"])
def test_fuzz_inputs(work, unraisable, fmt):
    """`capture` with a mutated inputs file: exit 0 only when the reference reader accepts the file and its
    validated arrays are what the manifest records; for unchanged arrays the logits are the unmutated ones."""
    from parity.run import read_capture

    rng = random.Random(SEED * 1000 + 7 + (fmt == "npz"))
    with np.load(GOLD_INPUTS) as z:
        arrays = {k: z[k] for k in z.files}
    ref = work / ("inputs-compressed.npz" if fmt == "npz-compressed" else f"inputs.{fmt}")
    if fmt == "npz":
        shutil.copy(GOLD_INPUTS, ref)
    elif fmt == "npz-compressed":
        np.savez_compressed(ref, **arrays)
    else:
        from safetensors.numpy import save_file

        save_file(arrays, str(ref))
    data = ref.read_bytes()
    hot = _npz_hot(data) if fmt.startswith("npz") else [(0, 8 + struct.unpack_from("<Q", data)[0])]
    out = _outdir(work, f"inputs-{fmt}")
    assert run_cli(["capture", GOLD_CKPT, "--inputs", ref, "-o", out / "c.safetensors", "--points", "logits"])[0] == 0
    base_t, base_m = read_capture(str(out / "c.safetensors"))
    os.remove(out / "c.safetensors")
    src = work / f"m-inputs.{fmt}"
    outcomes, t0 = Counter(), time.perf_counter()
    reader = _reference_npz if fmt.startswith("npz") else _reference_st
    for i in range(n_cases(f"inputs-{fmt}")):
        if fmt == "safetensors" and i % 2:
            header, body = hf.st_split(data)
            h, desc = mutate_json(rng, header, ANY_JSON)
            m = struct.pack("<Q", len(h)) + h + body
        else:
            m, desc = mutate_bytes(rng, data, hot)
        src.write_bytes(m)
        reference = reader(src)
        sha = _validated_sha(reference) if reference is not None else None
        code, err, dt = run_cli(
            ["capture", GOLD_CKPT, "--inputs", src, "-o", out / "c.safetensors", "--points", "logits"]
        )

        def ok():
            t, man = read_capture(str(out / "c.safetensors"))
            os.remove(out / "c.safetensors")
            if sha is None or man["inputs"]["sha256"] != sha:
                return None
            if sha == base_m["inputs"]["sha256"]:
                return "exit 0, same output" if t["logits"].tobytes() == base_t["logits"].tobytes() else None
            return "exit 0, what the reference reads"

        label = check(f"inputs-{fmt}", f"case {i}: {desc}", code, err, dt, out, ok)
        if code == 2 and sha is not None:
            label += " (reference accepts)"
        note(f"inputs-{fmt}", f"case {i}: {desc}", label, err)
        outcomes[label] += 1
    figures(f"inputs {fmt} (capture)", outcomes, time.perf_counter() - t0)
    assert not unraisable, unraisable


def test_fuzz_capture_files(work, unraisable):
    """parity.run.read_capture on mutated capture files: the reference's tensors and manifest, or one ParityError."""
    from safetensors import safe_open

    from parity.errors import ParityError
    from parity.run import read_capture

    rng = random.Random(SEED * 1000 + 9)
    out = _outdir(work, "capture")
    assert (
        run_cli(
            [
                "capture",
                GOLD_CKPT,
                "--inputs",
                GOLD_INPUTS,
                "-o",
                out / "c.safetensors",
                "--points",
                "img/projector,llm/layer00/out",
            ]
        )[0]
        == 0
    )
    data = (out / "c.safetensors").read_bytes()
    header, body = hf.st_split(data)
    src = work / "m-capture.safetensors"
    outcomes, t0 = Counter(), time.perf_counter()
    for i in range(n_cases("capture")):
        if i % 2:
            h, desc = mutate_json(rng, header, ANY_JSON)
            m = struct.pack("<Q", len(h)) + h + body
        else:
            m, desc = mutate_bytes(rng, data, [(0, 8 + struct.unpack_from("<Q", data)[0])])
        src.write_bytes(m)
        try:
            ref_t = _reference_st(src)
            with safe_open(str(src), "np") as f:
                ref_m = json.loads((f.metadata() or {}).get("parity_manifest", "{}"))
        except Exception:
            ref_t = ref_m = None
        t0_case = time.perf_counter()
        try:
            t, man = read_capture(str(src))
        except ParityError as e:
            assert "\n" not in str(e) and str(src) in str(e), (i, desc, str(e))
            label = "ParityError, one line" + (" (reference accepts)" if ref_t is not None else "")
            note("capture", f"case {i}: {desc}", label, str(e))
            outcomes[label] += 1
            continue
        finally:
            assert time.perf_counter() - t0_case < TIME_BOUND
        assert ref_t is not None and _same(t, ref_t) and man == ref_m, (i, desc)
        outcomes["read, equal to the reference"] += 1
    figures("capture files (read_capture)", outcomes, time.perf_counter() - t0)
    assert not unraisable, unraisable
