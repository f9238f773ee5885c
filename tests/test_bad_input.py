"""Bad input: a one-line error naming the file, the key, expected and found; exit status 2; nothing left behind."""

import json
import os
import struct

import numpy as np
import pytest
from click.testing import CliRunner

from parity import spec
from parity.cli import main
from parity.config import TINY_VARIANTS
from tests.ckpt_helpers import tiny_npz  # noqa: F401  (fixture)


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stderr.strip(), r.stdout


def assert_one_line_error(code, err, *must_contain):
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    for s in must_contain:
        assert str(s) in err, (s, err)


def assert_nothing_left(d, keep):
    assert sorted(os.listdir(d)) == sorted(keep)


@pytest.fixture
def out(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


def test_truncated_npz(tiny_npz, out):
    src, _ = tiny_npz()
    data = open(src, "rb").read()
    open(src, "wb").write(data[: len(data) // 2])
    code, err, _ = run("convert", src, "-o", out / "x", "--to", "safetensors")
    assert_one_line_error(code, err, src, "truncated or corrupt")
    assert_nothing_left(out, [])


def test_corrupt_zip_member_data_detected_midstream(tiny_npz, out):
    """Flipped bytes in a member's data: the CRC check fails during the conversion; the partial output is removed."""
    src, _ = tiny_npz("tiny-pg2-gqa")
    key = "params/llm/layers/mlp/linear.npy"
    data = bytearray(open(src, "rb").read())
    at = data.index(key.encode()) + 200  # inside that member's data (past its local header and npy header)
    data[at] ^= 0xFF
    open(src, "wb").write(bytes(data))
    code, err, _ = run("convert", src, "-o", out / "x", "--to", "safetensors")
    assert_one_line_error(code, err, src, "llm/layers/mlp/linear", "CRC-32", "expected", "found")
    assert_nothing_left(out, [])


def test_corrupt_zip_directory(tiny_npz, out):
    src, _ = tiny_npz()
    data = bytearray(open(src, "rb").read())
    cd = data.rindex(b"PK\x01\x02")  # a central directory record
    data[cd : cd + 4] = b"XXXX"
    open(src, "wb").write(bytes(data))
    code, err, _ = run("convert", src, "-o", out / "x.npz", "--to", "npz")
    assert_one_line_error(code, err, src)
    assert_nothing_left(out, [])


def test_not_a_checkpoint(tmp_path, out):
    p = tmp_path / "notes.txt"
    p.write_text("hello, I am not a checkpoint\n")
    code, err, _ = run("convert", p, "-o", out / "x", "--to", "safetensors")
    assert_one_line_error(code, err, p, "not a checkpoint")
    code, err, _ = run("inspect", p)
    assert_one_line_error(code, err, p, "not a checkpoint")


def test_npz_of_other_files_is_not_a_checkpoint(tmp_path, out):
    import zipfile

    p = tmp_path / "a.npz"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("readme.txt", "x")
    code, err, _ = run("inspect", p)
    assert_one_line_error(code, err, p, "readme.txt", "not an npz checkpoint")


def _st_file(tmp_path, header: dict, data: bytes = b""):
    h = json.dumps(header).encode()
    d = tmp_path / "lying"
    d.mkdir()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + data)
    return d


def test_safetensors_lying_header_offsets(tmp_path, out):
    d = _st_file(tmp_path, {"a.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}, b"\0" * 16)
    code, err, _ = run("convert", d, "-o", out / "x.npz", "--to", "npz")
    assert_one_line_error(code, err, d / "model.safetensors", "a.weight", "data_offsets [0, 64]", "lying header")
    assert_nothing_left(out, [])


def test_safetensors_lying_header_size_mismatch(tmp_path, out):
    d = _st_file(tmp_path, {"a.weight": {"dtype": "BF16", "shape": [4, 4], "data_offsets": [0, 16]}}, b"\0" * 16)
    code, err, _ = run("inspect", d)
    assert_one_line_error(code, err, "a.weight", "32 bytes for BF16[4, 4]", "data_offsets [0, 16]")


def test_safetensors_lying_header_length(tmp_path, out):
    d = tmp_path / "st"
    d.mkdir()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 10**9) + b'{"a": 1}')
    code, err, _ = run("inspect", d)
    assert_one_line_error(code, err, "model.safetensors", "<header>", "lying header length")


def test_missing_key(tiny_npz, tmp_path, out):
    cfg = TINY_VARIANTS["tiny-pg1-mqa"]
    params = spec.random_params(cfg)
    params.pop("llm/layers/mlp/linear")
    np.savez(tmp_path / "m.npz", **{"params/" + k: v for k, v in params.items()})
    code, err, _ = run("convert", tmp_path / "m.npz", "-o", out / "x", "--to", "safetensors", "--config", cfg.name)
    assert_one_line_error(
        code, err, "m.npz", "llm/layers/mlp/linear", "expected (2, 96, 64)", "found absent", "missing key"
    )
    assert_nothing_left(out, [])


def test_unexpected_key(tmp_path, out):
    cfg = TINY_VARIANTS["tiny-pg2-gqa"]
    params = spec.random_params(cfg)
    params["llm/layers/attn/extra/w"] = np.zeros((3, 2), np.float32)
    np.savez(tmp_path / "u.npz", **{"params/" + k: v for k, v in params.items()})
    code, err, _ = run("convert", tmp_path / "u.npz", "-o", out / "x", "--to", "safetensors", "--config", cfg.name)
    assert_one_line_error(
        code, err, "u.npz", "llm/layers/attn/extra/w", "expected absent", "found (3, 2)", "unexpected key"
    )
    assert_nothing_left(out, [])


def test_wrong_shape(tmp_path, out):
    cfg = TINY_VARIANTS["tiny-pg2-gqa"]
    params = spec.random_params(cfg)
    params["llm/layers/mlp/linear"] = params["llm/layers/mlp/linear"][:, :50]
    np.savez(tmp_path / "w.npz", **{"params/" + k: v for k, v in params.items()})
    code, err, _ = run("convert", tmp_path / "w.npz", "-o", out / "x", "--to", "safetensors", "--config", cfg.name)
    assert_one_line_error(code, err, "w.npz", "llm/layers/mlp/linear", "expected (3, 96, 48)", "found (3, 50, 48)")
    assert_nothing_left(out, [])


def test_unsupported_dtype(tmp_path, out):
    cfg = TINY_VARIANTS["tiny-pg1-mqa"]
    params = spec.random_params(cfg)
    params["llm/final_norm/scale"] = params["llm/final_norm/scale"].astype(np.int32)
    np.savez(tmp_path / "d.npz", **{"params/" + k: v for k, v in params.items()})
    code, err, _ = run("convert", tmp_path / "d.npz", "-o", out / "x", "--to", "safetensors")
    assert_one_line_error(code, err, "d.npz", "llm/final_norm/scale", "float32, float16 or bfloat16", "int32")
    assert_nothing_left(out, [])


def test_object_array_is_never_unpickled(tmp_path, out):
    arr = np.empty(2, dtype=object)
    np.savez(tmp_path / "o.npz", **{"params/img/head/bias": arr})
    code, err, _ = run("inspect", tmp_path / "o.npz")
    assert_one_line_error(code, err, "o.npz", "img/head/bias", "object array", "refusing to unpickle")


def test_config_does_not_match_shapes(tmp_path, out):
    """A pos_embedding for a larger image than the config's (the 448-vs-224 mistake, at tiny scale)."""
    cfg = TINY_VARIANTS["tiny-pg1-mqa"]
    params = spec.random_params(cfg)
    params["img/pos_embedding"] = np.zeros((1, 64, 32), np.float32)  # a 56 px grid; the config says 28 px
    np.savez(tmp_path / "c.npz", **{"params/" + k: v for k, v in params.items()})
    code, err, _ = run("convert", tmp_path / "c.npz", "-o", out / "x", "--to", "safetensors", "--config", cfg.name)
    assert_one_line_error(
        code, err, "c.npz", "img/pos_embedding", "expected (1, 16, 32)", "found (1, 64, 32)", "tiny-pg1-mqa"
    )
    assert_nothing_left(out, [])


def test_undetectable_config_asks_for_one(tmp_path, out):
    cfg = TINY_VARIANTS["tiny-pg1-mqa"]
    params = spec.random_params(cfg)
    params["img/pos_embedding"] = np.zeros((1, 64, 32), np.float32)
    np.savez(tmp_path / "c.npz", **{"params/" + k: v for k, v in params.items()})
    code, err, _ = run("convert", tmp_path / "c.npz", "-o", out / "x", "--to", "safetensors")
    assert_one_line_error(code, err, "c.npz", "--config")


def test_output_exists_without_overwrite(tiny_npz, out):
    src, _ = tiny_npz()
    (out / "x").mkdir()
    (out / "x" / "keep.txt").write_text("mine")
    code, err, _ = run("convert", src, "-o", out / "x", "--to", "safetensors")
    assert_one_line_error(code, err, out / "x", "--overwrite")
    assert os.listdir(out / "x") == ["keep.txt"]
    code, err, _ = run("convert", src, "-o", out / "x", "--to", "safetensors", "--overwrite")
    assert code == 0, err
    assert sorted(os.listdir(out / "x")) == ["config.json", "model.safetensors"]
    assert_nothing_left(out, ["x"])


def test_unwritable_output_directory(tiny_npz, tmp_path):
    src, _ = tiny_npz()
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, err, _ = run("convert", src, "-o", blocker / "x.npz", "--to", "npz")
    assert_one_line_error(code, err, blocker, "not a directory")
    # /proc refuses new files even to root
    code, err, _ = run("convert", src, "-o", "/proc/parity-test-out", "--to", "safetensors")
    assert_one_line_error(code, err, "/proc", "cannot write")
    assert not os.path.exists("/proc/parity-test-out")


def test_invalid_max_shard_size(tiny_npz, out):
    src, _ = tiny_npz()
    code, err, _ = run("convert", src, "-o", out / "x", "--to", "safetensors", "--max-shard-size", "lots")
    assert_one_line_error(code, err, "lots")
    assert_nothing_left(out, [])


# -- hostile input: every reproduction of issue 10, each one line and exit 2 -------------------------------------
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import zipfile  # noqa: E402

from tests import hostile_files as hf  # noqa: E402

LN0 = "params/img/Transformer/encoderblock/LayerNorm_0/scale.npy"
LN1 = "params/img/Transformer/encoderblock/LayerNorm_1/scale.npy"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def no_hang():
    """Fail instead of blocking forever (a FIFO opened for reading waits for a writer)."""

    def boom(*_):
        raise TimeoutError("blocked: a hang")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _mutated_npz(tiny_npz, mutate, name="tiny-pg2-gqa"):
    src, _ = tiny_npz(name)
    data = bytearray(open(src, "rb").read())
    mutate(data)
    open(src, "wb").write(bytes(data))
    return src


def _both_ways(src, out, *must):
    """inspect, inspect --verify and convert all refuse `src` with one line; nothing is left behind."""
    for args in (
        ["inspect", src],
        ["inspect", "--verify", src],
        ["convert", src, "-o", out / "x", "--to", "safetensors"],
    ):
        code, err, _ = run(*args)
        assert_one_line_error(code, err, *must)
    assert_nothing_left(out, [])


def test_npz_directory_entry_pointing_at_another_members_header(tiny_npz, out):
    """Silent wrong value before: LayerNorm_0's entry read LayerNorm_1's data (np.load refuses: names differ)."""

    def mutate(d):
        a, b = hf.record(d, LN0), hf.record(d, LN1)
        hf.put(d, a["pos"] + hf.CD["offset"], "<I", b["offset"])
        hf.put(d, a["pos"] + hf.CD["crc"], "<I", b["crc"])

    src = _mutated_npz(tiny_npz, mutate)
    with pytest.raises(zipfile.BadZipFile, match="differ"):
        np.load(src)[LN0[:-4]]
    _both_ways(src, out, "LayerNorm_0/scale", "directory and local header differ")


@pytest.mark.parametrize(
    "case", ["eocd+7", "name 0xff utf8", "version 9.9", "method 99", "encrypted", "local name", "local crc"]
)
def test_npz_crafted_zip_structures(tiny_npz, out, case):
    def mutate(d):
        r = hf.record(d, LN0)
        p = r["pos"]
        if case == "eocd+7":
            e = d.rindex(b"PK\x05\x06")
            hf.put(d, e + hf.EOCD_CD_OFFSET, "<I", struct.unpack_from("<I", d, e + hf.EOCD_CD_OFFSET)[0] + 7)
        elif case == "name 0xff utf8":
            d[p + hf.CD["name"] + 3] = 0xFF
            hf.put(d, p + hf.CD["flags"], "<H", 0x800)
        elif case == "version 9.9":
            d[p + hf.CD["extract_version"]] = 99
        elif case == "method 99":
            hf.put(d, p + hf.CD["method"], "<H", 99)
            hf.put(d, r["offset"] + hf.LH["method"], "<H", 99)
        elif case == "encrypted":
            hf.put(d, p + hf.CD["flags"], "<H", 1)
            hf.put(d, r["offset"] + hf.LH["flags"], "<H", 1)
        elif case == "local name":
            d[r["offset"] + hf.LH["name"] + 8] ^= 0x20  # the local header's copy of the name only
        elif case == "local crc":
            d[r["offset"] + hf.LH["crc"]] ^= 0x01

    src = _mutated_npz(tiny_npz, mutate)
    if case != "local crc":  # np.load ignores the local copy of the CRC; a disagreement is corruption all the same
        with pytest.raises(Exception):  # noqa: B017 (numpy raises several kinds) the reference reader refuses every other one too
            with np.load(src) as z:
                [z[k] for k in z.files]
    _both_ways(src, out, src)


@pytest.mark.parametrize(
    "header,what",
    [
        ("{'descr': '<f4', 'fortran_order': False, 'shape': (18446744073709551616,), }", "truncated or corrupt"),
        ("{'descr': '<f4', 'fortran_order': False, 'shape': (4,), 'extra': 1, }", "exactly the keys"),
        ("{'descr': '<f4', 'fortran_order': False, 'shape': (4.0,), }", "non-negative integers"),
        ("{'descr': '<f4', 'fortran_order': False, 'shape': ('4',), }", "non-negative integers"),
        ("{'descr': '<f4', 'fortran_order': 0, 'shape': (4,), }", "fortran_order"),
        ("{'descr': 7, 'fortran_order': False, 'shape': (4,), }", "dtype"),
        ("[" * 5000 + "]" * 5000, "npy header"),
    ],
)
def test_npz_crafted_npy_headers(tmp_path, out, header, what):
    p = tmp_path / "h.npz"
    hf.raw_npz(p, {"params/img/head/bias.npy": hf.npy_bytes(header, b"\0" * 16)})
    _both_ways(p, out, "img/head/bias", what)


def test_npz_crc_failure_found_by_verify_only(tiny_npz, out):
    def mutate(d):
        d[hf.member_data(d, LN0) + 128 + 4] ^= 0x40  # inside the data, past the npy header

    src = _mutated_npz(tiny_npz, mutate)
    code, err, stdout = run("inspect", src)
    assert code == 0 and "tensor data was not read" in stdout and "--verify" in stdout
    code, err, _ = run("inspect", "--verify", src)
    assert_one_line_error(code, err, "LayerNorm_0/scale", "CRC-32")
    code, _, stdout = run("inspect", "--verify", "--json", _mutated_npz(tiny_npz, lambda d: None, "tiny-pg1-mqa"))
    assert code == 0 and json.loads(stdout)["data_verified"] is True


def _st_dir(tiny_npz, tmp_path, name="st", max_shard=None):
    from converters.convert import convert as conv

    src, _ = tiny_npz()
    conv(src, tmp_path / name, "safetensors", max_shard_size=max_shard)
    return tmp_path / name


def _rewrite_header(path, fn, raw=None):
    data = open(path, "rb").read()
    h, body = hf.st_split(data)
    h = fn(h) if fn else h
    open(path, "wb").write(hf.st_join(h, body, raw(h) if raw else None))


Q0 = "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize("relabel", ["F16 first half", "BF16 second half"])
def test_safetensors_relabelled_tensor_leaving_unclaimed_bytes(tiny_npz, tmp_path, out, relabel):
    """Silent wrong value before (-2964.0 for -0.2226): the offsets must tile the data section exactly."""
    d = _st_dir(tiny_npz, tmp_path)

    def fn(h):
        b, e = h[Q0]["data_offsets"]
        half = (e - b) // 2
        h[Q0]["dtype"], h[Q0]["data_offsets"] = (
            ("F16", [b, b + half]) if relabel.startswith("F16") else ("BF16", [b + half, e])
        )
        return h

    _rewrite_header(d / "model.safetensors", fn)
    from safetensors.numpy import load_file

    with pytest.raises(Exception, match="offset|covered"):
        load_file(d / "model.safetensors")
    for args in (["convert", d, "-o", out / "x.npz", "--to", "npz"], ["inspect", d]):
        code, err, _ = run(*args)
        assert_one_line_error(code, err, "lying header")
    assert_nothing_left(out, [])


@pytest.mark.parametrize(
    "case,must",
    [
        ("metadata string", "__metadata__"),
        ("metadata list", "__metadata__"),
        ("metadata number", "__metadata__"),
        ("metadata int value", "__metadata__"),
        ("shape 2**64", "non-negative integers"),
        ("shape Infinity", "Infinity is not JSON"),
        ("shape string", "non-negative integers"),
        ("shape float", "non-negative integers"),
        ("offsets strings", "data_offsets"),
        ("offsets floats", "data_offsets"),
        ("nested 100000", "nested too deeply"),
        ("dtype F8_E4M3", "F8_E4M3"),
        ("trailing bytes", "trailing bytes"),
        ("duplicate key", "duplicate key"),
        ("entry not object", "malformed"),
    ],
)
def test_safetensors_crafted_headers(tiny_npz, tmp_path, out, case, must):
    d = _st_dir(tiny_npz, tmp_path)
    f = d / "model.safetensors"
    raw = None
    if case.startswith("metadata"):
        v = {"metadata string": "x", "metadata list": [1], "metadata number": 3, "metadata int value": {"a": 1}}
        fn = lambda h: {**h, "__metadata__": v[case]}
    elif case.startswith("shape") or case.startswith("offsets"):
        field, val = {
            "shape 2**64": ("shape", [2**64, 32]),
            "shape string": ("shape", ["32", 32]),
            "shape float": ("shape", [32.0, 32]),
            "offsets strings": ("data_offsets", ["0", "4096"]),
            "offsets floats": ("data_offsets", [0.0, 4096.0]),
            "shape Infinity": ("shape", [float("inf"), 32]),
        }[case]
        fn = lambda h: (h[Q0].__setitem__(field, val), h)[1]
    elif case == "nested 100000":
        fn, raw = None, lambda h: b'{"__metadata__": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    elif case == "dtype F8_E4M3":

        def fn(h):
            h[Q0]["dtype"] = "F8_E4M3"
            h[Q0]["shape"] = [h[Q0]["shape"][0] * 4, h[Q0]["shape"][1]]
            return h
    elif case == "trailing bytes":
        fn = None
        open(f, "ab").write(b"\0" * 8)
    elif case == "duplicate key":
        fn, raw = (
            None,
            lambda h: (lambda s: s[:-1] + ", " + json.dumps(Q0) + ": " + json.dumps(h[Q0]) + "}")(
                json.dumps(h)
            ).encode(),
        )
    else:
        fn = lambda h: {**h, Q0: [1, 2]}
    _rewrite_header(f, fn, raw)
    for args in (["convert", d, "-o", out / "x.npz", "--to", "npz"], ["inspect", "--verify", d]):
        code, err, _ = run(*args)
        assert_one_line_error(code, err, "model.safetensors", must)
    assert_nothing_left(out, [])


@pytest.mark.parametrize(
    "case,must",
    [
        ("top list", "a list"),
        ("top string", "a string"),
        ("text_config list", "text_config must be an object"),
        ("vision_config string", "vision_config must be an object"),
        ("rope_parameters list", "rope_parameters must be an object"),
        ("zero heads", "num_attention_heads"),
        ("zero kv heads", "num_key_value_heads"),
        ("zero patch", "patch_size"),
        ("width string", "hidden_size"),
        ("width float", "hidden_size must be an integer"),
        ("eps string", "rms_norm_eps"),
        ("softcap list", "attn_logit_softcapping"),
        ("depth huge", "num_hidden_layers"),
        ("invalid json", "unreadable"),
        ("nested", "nested too deeply"),
    ],
)
def test_hf_config_json_hostile(tiny_npz, tmp_path, out, case, must):
    d = _st_dir(tiny_npz, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["parity_config"]  # a hub-style config.json
    t, v = cfg["text_config"], cfg["vision_config"]
    text = None
    if case == "top list":
        cfg = [cfg]
    elif case == "top string":
        cfg = "paligemma"
    elif case == "text_config list":
        cfg["text_config"] = [t]
    elif case == "vision_config string":
        cfg["vision_config"] = "siglip"
    elif case == "rope_parameters list":
        t["rope_parameters"] = [10000.0]
    elif case == "zero heads":
        t["num_attention_heads"] = 0
    elif case == "zero kv heads":
        t["num_key_value_heads"] = 0
    elif case == "zero patch":
        v["patch_size"] = 0
    elif case == "width string":
        t["hidden_size"] = "48"
    elif case == "width float":
        t["hidden_size"] = 48.0
    elif case == "eps string":
        t["rms_norm_eps"] = "1e-6"
    elif case == "softcap list":
        t["attn_logit_softcapping"] = [50.0]
    elif case == "depth huge":
        t["num_hidden_layers"] = 10**12
    elif case == "invalid json":
        text = json.dumps(cfg)[:-3]
    elif case == "nested":
        text = '{"a": ' + "[" * 100000 + "]" * 100000 + "}"
    (d / "config.json").write_text(text if text is not None else json.dumps(cfg))
    for args in (
        ["inspect", d],
        ["convert", d, "-o", out / "x.npz", "--to", "npz"],
        ["inspect", tiny_npz()[0], "--config", d / "config.json"],
    ):
        code, err, _ = run(*args)
        assert_one_line_error(code, err, "config.json", must)
    assert_nothing_left(out, [])


def test_hub_style_config_json_still_reads(tiny_npz, tmp_path, out):
    d = _st_dir(tiny_npz, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["parity_config"]
    (d / "config.json").write_text(json.dumps(cfg))
    code, err, _ = run("convert", d, "-o", out / "x.npz", "--to", "npz")
    assert code == 0, err


@pytest.mark.parametrize(
    "case,must",
    [
        ("list", "a list"),
        ("string", "a string"),
        ("zero kv heads", "num_kv_heads"),
        ("width float", "text.width"),
        ("width string", "text"),
        ("vision list", "vision"),
        ("gemma2 string", "gemma2"),
        ("unknown field", "colour"),
    ],
)
def test_sidecar_hostile(tiny_npz, tmp_path, out, case, must):
    from converters.convert import convert as conv

    src, _ = tiny_npz()
    conv(src, tmp_path / "ref.npz", "npz")
    side = tmp_path / "ref.npz.parity.json"
    c = json.loads(side.read_text())
    if case == "list":
        c = [c]
    elif case == "string":
        c = "tiny"
    elif case == "zero kv heads":
        c["text"]["num_kv_heads"] = 0
    elif case == "width float":
        c["text"]["width"] = 48.0
    elif case == "width string":
        c["text"]["width"] = "48"
    elif case == "vision list":
        c["vision"] = [1]
    elif case == "gemma2 string":
        c["text"]["gemma2"] = "yes"
    else:
        c["text"]["colour"] = "blue"
    side.write_text(json.dumps(c))
    for args in (
        ["inspect", tmp_path / "ref.npz"],
        ["convert", tmp_path / "ref.npz", "-o", out / "x", "--to", "safetensors"],
    ):
        code, err, _ = run(*args)
        assert_one_line_error(code, err, "parity.json", must)
    assert_nothing_left(out, [])


@pytest.mark.parametrize(
    "case,must",
    [
        ("list", "weight_map"),
        ("string", "weight_map"),
        ("null", "weight_map"),
        ("value not string", "shard file"),
        ("path in value", "shard file"),
        ("top list", "a list"),
        ("tensor not listed", "does not list"),
        ("nested", "nested too deeply"),
    ],
)
def test_index_json_hostile(tiny_npz, tmp_path, out, case, must):
    d = _st_dir(tiny_npz, tmp_path, max_shard="20KB")
    p = d / "model.safetensors.index.json"
    idx = json.loads(p.read_text())
    wm = idx["weight_map"]
    text = None
    if case == "list":
        idx["weight_map"] = list(wm)
    elif case == "string":
        idx["weight_map"] = "model-00001-of-00002.safetensors"
    elif case == "null":
        idx["weight_map"] = None
    elif case == "value not string":
        wm[Q0] = 1
    elif case == "path in value":
        wm[Q0] = "../" + os.path.basename(d) + "/" + wm[Q0]
    elif case == "top list":
        idx = [idx]
    elif case == "tensor not listed":
        del wm[Q0]
    else:
        text = '{"weight_map": ' + "{" * 0 + "[" * 100000 + "]" * 100000 + "}"
    p.write_text(text if text is not None else json.dumps(idx))
    for args in (["inspect", d], ["convert", d, "-o", out / "x.npz", "--to", "npz"], ["inspect", p]):
        code, err, _ = run(*args)
        assert_one_line_error(code, err, "index.json", must)
    assert_nothing_left(out, [])


def _capture(ckpt, inputs, output, *extra):
    return run("capture", ckpt, "--inputs", inputs, "-o", output, *extra)


GOLD_CKPT = os.path.join(ROOT, "golden", "tiny-pg1-mqa.npz")
GOLD_INPUTS = os.path.join(ROOT, "golden", "tiny-inputs.npz")


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_inputs_image_needing_49_tib(tmp_path, out, fmt):
    """The header declares an image of 49 TiB: refused from the header, before any allocation."""
    shape = (1, 2_100_000, 2_100_000, 3)
    p = tmp_path / f"in.{fmt}"
    if fmt == "npz":
        hf.raw_npz(
            p,
            {
                "image.npy": hf.npy_bytes(
                    f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}", b"\0" * 64
                ),
                "text.npy": hf.npy_bytes(
                    "{'descr': '<i4', 'fortran_order': False, 'shape': (1, 2), }", b"\2\0\0\0\3\0\0\0"
                ),
            },
        )
    else:
        h = {"image": {"dtype": "F32", "shape": list(shape), "data_offsets": [0, 64]}}
        p.write_bytes(hf.st_join(h, b"\0" * 64))
    code, err, _ = _capture(GOLD_CKPT, p, out / "c.safetensors")
    assert_one_line_error(code, err, p, "image")
    assert_nothing_left(out, [])


@pytest.mark.parametrize("case", ["encrypted", "method 99", "crc", "extra key"])
def test_inputs_npz_hostile(tmp_path, out, case):
    data = bytearray(open(GOLD_INPUTS, "rb").read())
    r = hf.record(data, "text.npy")
    if case == "encrypted":
        hf.put(data, r["pos"] + hf.CD["flags"], "<H", 1)
        hf.put(data, r["offset"] + hf.LH["flags"], "<H", 1)
    elif case == "method 99":
        hf.put(data, r["pos"] + hf.CD["method"], "<H", 99)
        hf.put(data, r["offset"] + hf.LH["method"], "<H", 99)
    elif case == "crc":
        data[hf.member_data(data, "text.npy") + 128] ^= 1
    p = tmp_path / "in.npz"
    p.write_bytes(bytes(data))
    if case == "extra key":
        with np.load(GOLD_INPUTS) as z:
            arrays = {k: z[k] for k in z.files}
        b = arrays["text"].tobytes()
        hf.raw_npz(
            p,
            {
                **{
                    f"{k}.npy": hf.npy_bytes(
                        f"{{'descr': '{v.dtype.str}', 'fortran_order': False, 'shape': {v.shape}, }}", v.tobytes()
                    )
                    for k, v in arrays.items()
                    if k != "text"
                },
                "text.npy": hf.npy_bytes(
                    f"{{'descr': '<i4', 'fortran_order': False, 'shape': {arrays['text'].shape}, 'x': 0, }}", b
                ),
            },
        )
    code, err, _ = _capture(GOLD_CKPT, p, out / "c.safetensors")
    assert_one_line_error(code, err, p, "text")
    assert_nothing_left(out, [])


@pytest.mark.parametrize("target", ["checkpoint", "shard", "inputs", "config", "sidecar", "index"])
def test_fifo_is_refused_before_open(tiny_npz, tmp_path, out, no_hang, target):
    fifo = tmp_path / "fifo"
    if target == "checkpoint":
        os.mkfifo(fifo)
        args = ["inspect", fifo]
    elif target == "inputs":
        os.mkfifo(fifo)
        args = ["capture", GOLD_CKPT, "--inputs", fifo, "-o", out / "c.safetensors"]
    elif target == "config":
        os.mkfifo(fifo)
        args = ["inspect", tiny_npz()[0], "--config", fifo]
    elif target == "sidecar":
        src, _ = tiny_npz()
        os.mkfifo(src + ".parity.json")
        args = ["inspect", src]
    else:
        d = _st_dir(tiny_npz, tmp_path, max_shard="20KB" if target == "shard" else None)
        name = (
            sorted(n for n in os.listdir(d) if n.startswith("model-"))[0]
            if target == "shard"
            else "model.safetensors.index.json"
        )
        if target == "index":
            os.remove(d / "model.safetensors")
        else:
            os.remove(d / name)
        os.mkfifo(d / name)
        args = ["inspect", d]
    code, err, _ = run(*args)
    assert_one_line_error(code, err, "a regular file", "FIFO")
    assert_nothing_left(out, [])


@pytest.mark.parametrize("case", ["manifest not json", "manifest list", "trailing", "fifo"])
def test_read_capture_hostile(tmp_path, no_hang, case):
    from parity.errors import ParityError
    from parity.run import read_capture

    p = tmp_path / "c.safetensors"
    if case == "fifo":
        os.mkfifo(p)
    else:
        meta = {"parity_manifest": "{" if case == "manifest not json" else "[1]"}
        data = hf.st_file({"logits": np.zeros((1, 2), np.float32)}, {"logits": "F32"}, meta)
        p.write_bytes(data + (b"\0" * 4 if case == "trailing" else b""))
    with pytest.raises(ParityError) as e:
        read_capture(str(p))
    assert "\n" not in str(e.value) and str(p) in str(e.value)


def _cli_subprocess(args, limit_bytes=None, timeout=120):
    """The real CLI in a fresh interpreter (stderr exactly as a user sees it); optionally with a file size limit
    (writes past it fail with EFBIG, the way a full disk fails with ENOSPC)."""
    import resource

    def pre():
        if limit_bytes is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run(
        [sys.executable, "-m", "parity.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=pre,
        timeout=timeout,
    )


@pytest.mark.parametrize("to", ["npz", "safetensors", "capture"])
def test_disk_full_is_one_line(tiny_npz, out, to):
    src, _ = tiny_npz()
    if to == "capture":
        args = ["capture", GOLD_CKPT, "--inputs", GOLD_INPUTS, "-o", out / "c.safetensors"]
    else:
        args = ["convert", src, "-o", out / "x", "--to", to]
    r = _cli_subprocess(args, limit_bytes=20_000)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "cannot write" in r.stderr and "File too large" in r.stderr
    assert_nothing_left(out, [])


def test_enospc_mid_tensor_is_one_line(tiny_npz, out, monkeypatch):
    import converters.rawio as rawio

    real = rawio.write_chunks
    calls = [0]

    def full(f, *a):
        calls[0] += 1
        if calls[0] == 5:
            f.write(b"\0" * 100)
            raise OSError(28, "No space left on device")
        return real(f, *a)

    monkeypatch.setattr(rawio, "write_chunks", full)
    import converters.npz_write
    import converters.safetensors_io

    monkeypatch.setattr(converters.npz_write, "write_chunks", full)
    monkeypatch.setattr(converters.safetensors_io, "write_chunks", full)
    src, _ = tiny_npz()
    for to in ("npz", "safetensors"):
        calls[0] = 0
        code, err, _ = run("convert", src, "-o", out / "x", "--to", to)
        assert_one_line_error(code, err, out / "x", "No space left on device")
        assert_nothing_left(out, [])


def test_clean_error_in_convert_to_npz_has_no_zipfile_noise(tiny_npz, out):
    """A CRC failure half-way through writing an npz: one line on stderr, no `ZipFile.__del__` traceback after."""
    src = _mutated_npz(
        tiny_npz,
        lambda d: d.__setitem__(
            d.index(b"params/llm/layers/mlp/linear.npy") + 300,
            d[d.index(b"params/llm/layers/mlp/linear.npy") + 300] ^ 1,
        ),
    )
    r = _cli_subprocess(["convert", src, "-o", out / "x.npz", "--to", "npz"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "CRC-32" in r.stderr, r.stderr
    assert_nothing_left(out, [])


def test_compressed_inputs_read_compressed_checkpoints_refused(tmp_path, out):
    """np.savez_compressed inputs are read (inflated within their declared size, CRC checked); checkpoints must
    be np.savez (their members are read by byte range)."""
    from parity.inputs import load_inputs

    with np.load(GOLD_INPUTS) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez_compressed(tmp_path / "in.npz", **arrays)
    got = load_inputs(tmp_path / "in.npz")
    want = load_inputs(GOLD_INPUTS)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    params = spec.random_params(TINY_VARIANTS["tiny-pg1-mqa"])
    np.savez_compressed(tmp_path / "c.npz", **{"params/" + k: v for k, v in params.items()})
    code, err, _ = run("convert", tmp_path / "c.npz", "-o", out / "x", "--to", "safetensors")
    assert_one_line_error(code, err, "np.savez")


def test_verify_counts_non_finite_values(tiny_npz, tmp_path, out):
    d = _st_dir(tiny_npz, tmp_path)
    f = d / "model.safetensors"
    h, body = hf.st_split(f.read_bytes())
    b = h[Q0]["data_offsets"][0]
    body = bytearray(body)
    body[b : b + 8] = np.array([np.nan, np.inf], np.float32).tobytes()
    f.write_bytes(hf.st_join(h, bytes(body)))
    code, _, stdout = run("inspect", d, "--json")
    assert code == 0 and json.loads(stdout)["data_verified"] is False
    code, _, stdout = run("inspect", d, "--verify", "--json")
    r = json.loads(stdout)
    assert code == 1 and r["data_verified"] is True
    assert [x["key"] for x in r["departures"]] == [Q0] and "2 NaN or infinite" in r["departures"][0]["found"]
