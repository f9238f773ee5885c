"""`parity assets` and catalog keys as checkpoints, against tests/fake_hub.py (a local HTTP server standing in for
the Hugging Face Hub and Kaggle; no network) with the hub caches under tmp_path. The fake assets are the shipped
golden/tiny-pg2-gqa.b16.npz (Kaggle) and its safetensors conversion in two shards (Hugging Face)."""

import filecmp
import hashlib
import json
import os
import re
import shutil

import pytest
from click.testing import CliRunner

from converters.convert import convert
from parity import assets, spec
from parity.cli import main
from parity.config import VARIANTS, get_config
from tests.fake_hub import FakeHub

pytest.importorskip("huggingface_hub")
pytest.importorskip("kagglehub")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN_NPZ = os.path.join(ROOT, "golden", "tiny-pg2-gqa.b16.npz")
INPUTS = os.path.join(ROOT, "golden", "tiny-inputs.npz")
NPZ = "tiny-pg2-gqa.b16.npz"
HANDLE = "google/tiny-pg2/jax/tiny-pg2-gqa"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(r, *fragments):
    assert r.exit_code == 2, (r.exit_code, r.output)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# -- the shipped catalog --------------------------------------------------------------------------------------------
def test_catalog_names_every_released_family():
    cat = assets.assets(assets.DEFAULT_CATALOG)
    want = [f"pg1-3b-pt-{r}" for r in (224, 448, 896)] + ["pg1-3b-mix-224", "pg1-3b-mix-448"]
    want += [f"pg2-{s}-{r}" for s in ("3b", "10b", "28b") for r in (224, 448, 896)]
    want += [f"pg2-{s}-mix-{r}" for s in ("3b", "10b", "28b") for r in (224, 448)]
    want += ["pg2-3b-ft-docci-448", "pg2-10b-ft-docci-448", "pg1-3b-ft-docvqa-896", "pg1-3b-ft-ocrvqa-224"]
    want += ["siglip-so400m-224", "siglip-so400m-384"] + [
        f"gemma2-{s}{t}" for s in ("2b", "9b", "27b") for t in ("", "-it")
    ]
    assert not set(want) - set(cat), sorted(set(want) - set(cat))
    assert cat["pg2-3b-224"]["hf_id"] == "google/paligemma2-3b-pt-224"
    assert cat["pg2-3b-224"]["kaggle"] == "kaggle:google/paligemma-2/jax/paligemma2-3b-pt-224"
    assert len({a["hf_id"] for a in cat.values()}) == len(cat)


# Published parameter counts (keras-hub presets), written here independently of the catalog and of parity.spec.
PUBLISHED = {
    "paligemma-3b": (2_923_335_408, 2_924_220_144, 2_927_759_088),
    "paligemma2-3b": (3_032_094_960, 3_032_979_696, 3_036_518_640),
    "paligemma2-10b": (9_662_409_456, 9_663_294_192, 9_666_833_136),
    "paligemma2-28b": (27_650_192_112, 27_651_076_848, 27_654_615_792),
}


def test_every_checkpoint_names_a_released_variant_with_its_published_parameter_count():
    for a in assets.assets(assets.DEFAULT_CATALOG).values():
        if a["kind"] == "tower":
            assert a["variant"] is None and a["kaggle"] is None and "not a PaliGemma checkpoint" in a["note"]
            continue
        assert a["variant"] in VARIANTS, a["key"]
        llm, res = a["variant"].rsplit("-", 1)
        published = PUBLISHED[llm][(224, 448, 896).index(int(res))]
        assert a["params"] == published == spec.param_count(get_config(a["variant"])), a["key"]
        name = a["hf_id"].removeprefix("google/")
        assert re.fullmatch(r"kaggle:google/paligemma(-2)?/jax/" + re.escape(name), a["kaggle"]), a["key"]
        npz = [f for f in a["files"] if f["source"] == "kaggle"]
        assert npz and all(f["name"].startswith(name + ".") and f["name"].endswith(".npz") for f in npz), a["key"]
        assert name.endswith(res) and (name.startswith("paligemma2-") == llm.startswith("paligemma2"))


def test_nothing_unknown_is_claimed():
    """No invented hashes or sizes: unrecorded means null; every unconfirmed id or handle says so in its note."""
    doc = assets.load_catalog(assets.DEFAULT_CATALOG)
    for a in doc["assets"]:
        for f in a["files"]:
            assert f["sha256"] is None or re.fullmatch(r"[0-9a-f]{64}", f["sha256"]), (a["key"], f)
            assert f["size"] is None or (isinstance(f["size"], int) and f["size"] > 0), (a["key"], f)
        for field, ok in a["confirmed"].items():
            assert ok in (True, False, None), a["key"]
            if ok is False:
                assert "not seen in a source" in a["note"], (a["key"], field)
    with open(assets.DEFAULT_CATALOG) as f:
        assert f.read() == assets.dump_catalog(doc)  # `record` rewrites it in the same layout


def test_list_json_and_table():
    r = invoke("assets", "list", "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert len(rows) == len(assets.assets())
    for row in rows:
        assert {"key", "hf_id", "kaggle", "variant", "params", "files"} <= set(row)
    r = invoke("assets", "list")
    assert r.exit_code == 0 and "pg2-10b-448" in r.stdout and "unconfirmed" in r.stdout


# -- against the fake hub -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_st(tmp_path_factory):
    d = tmp_path_factory.mktemp("st") / "st"
    convert(GOLDEN_NPZ, str(d), "safetensors", max_shard_size=200_000)
    names = sorted(os.listdir(d))
    assert "model.safetensors.index.json" in names and sum(n.endswith(".safetensors") for n in names) >= 2
    return d


def fake_entry(key, hf_id, handle, npz_sha=None, hf_files=("config.json", "model.safetensors.index.json")):
    cfg = get_config("tiny-pg2-gqa")
    return {
        "key": key,
        "kind": "paligemma",
        "hf_id": hf_id,
        "kaggle": f"kaggle:{handle}",
        "variant": cfg.name,
        "params": spec.param_count(cfg),
        "confirmed": {"hf_id": False, "kaggle": False},
        "note": "a test asset, not seen in a source",
        "files": [{"source": "hf", "name": n, "size": None, "sha256": None} for n in hf_files]
        + [{"source": "kaggle", "name": NPZ, "size": None, "sha256": npz_sha, "dtype": "bfloat16"}],
    }


@pytest.fixture
def hub(tmp_path, monkeypatch, tiny_st):
    """The fake hub serving the tiny assets, both clients pointed at it, caches and catalog under tmp_path."""
    import huggingface_hub.constants as c
    from kagglesdk.kaggle_env import KaggleEnv, _env_to_endpoint

    good = sha256(GOLDEN_NPZ)
    doc = {
        "schema": 1,
        "about": "test catalog",
        "assets": [
            fake_entry("tiny", "google/tiny-pg2", HANDLE, good),
            fake_entry("tiny-unhashed", "google/tiny-pg2", HANDLE),
            fake_entry("tiny-bad", "google/tiny-pg2", HANDLE, "0" * 64),
            fake_entry("tiny-gone", "google/not-there", "google/tiny-pg2/jax/not-there"),
        ],
    }
    catalog = tmp_path / "catalog.json"
    catalog.write_text(assets.dump_catalog(doc))
    with FakeHub(lifetime=120) as h:
        h.hf["google/tiny-pg2"] = {n: (tiny_st / n).read_bytes() for n in os.listdir(tiny_st)}
        h.kaggle[HANDLE] = (3, {NPZ: open(GOLDEN_NPZ, "rb").read()})
        monkeypatch.setenv(assets.CATALOG_ENV, str(catalog))
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf"))
        monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kaggle"))
        monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "LOCALHOST")  # kagglehub 1.0 reads no endpoint URL from the
        monkeypatch.setitem(_env_to_endpoint, KaggleEnv.LOCAL, h.url)  # environment: its LOCALHOST host is the fake
        monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no-credentials"))
        for v in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
            monkeypatch.delenv(v, raising=False)
        h.catalog = catalog
        yield h


def verify(*args):
    r = invoke("assets", "verify", *args, "--json")
    return r.exit_code, json.loads(r.stdout)


def test_kaggle_download_verified_then_the_key_is_a_checkpoint(hub, tmp_path):
    code, rep = verify("tiny")
    assert code == 1 and rep["assets"][0]["status"] == "absent"
    r = invoke("convert", "tiny", "-o", tmp_path / "a", "--to", "safetensors")
    one_line_error(r, "tiny", "not downloaded", "parity assets download tiny")
    r = invoke("capture", "tiny", "--inputs", INPUTS, "-o", tmp_path / "c.safetensors")
    one_line_error(r, "tiny", "not downloaded", "parity assets download tiny")
    assert os.listdir(tmp_path) == ["catalog.json"]  # nothing written (the caches are made by downloads only)

    r = invoke("assets", "download", "tiny", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["status"] == "verified"
    path = rep["sources"][0]["files"][0]["path"]
    assert path.startswith(str(tmp_path / "kaggle")) and filecmp.cmp(path, GOLDEN_NPZ, shallow=False)
    assert verify("tiny")[0] == 0 and invoke("assets", "verify", "tiny").stdout.startswith("tiny: verified")

    # the key wherever a checkpoint path goes: the same conversion as from the file itself
    assert invoke("convert", "tiny", "-o", tmp_path / "a", "--to", "safetensors").exit_code == 0
    convert(GOLDEN_NPZ, str(tmp_path / "b"), "safetensors")
    a, b = tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors"
    assert filecmp.cmp(a, b, shallow=False)
    r = invoke("inspect", "tiny", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["config"] == "tiny-pg2-gqa", r.output


def test_hf_download_resumes_a_truncated_file_and_the_snapshot_is_a_checkpoint(hub, tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    # huggingface_hub keeps whole chunks only (10 MB); chunks of 16 KiB put the cut after some of them
    monkeypatch.setattr(c, "DOWNLOAD_CHUNK_SIZE", 16 << 10)
    shard = next(n for n in hub.hf["google/tiny-pg2"] if n.endswith(".safetensors"))
    hub.truncate[shard] = 1
    r = invoke("assets", "download", "tiny", "--source", "hf", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["status"] == "unrecorded"  # complete; the hf files have no recorded hash to check against
    ranged = [q for q in hub.requests if q[0] == "GET" and shard in q[1] and q[2]]
    assert ranged and ranged[0][2].startswith("bytes="), [q for q in hub.requests if shard in q[1]]  # resumed
    names = {f["name"]: f for f in rep["sources"][0]["files"]}
    assert shard in names and len(names) >= 4 and all(f["status"] == "unrecorded" for f in names.values())
    assert open(names[shard]["path"], "rb").read() == hub.hf["google/tiny-pg2"][shard]
    assert assets.checkpoint_path("tiny").startswith(str(tmp_path / "hf"))  # no kaggle copy: the snapshot
    r = invoke("assets", "record", "tiny", "--source", "hf", "--json")  # the shards become records, hashed
    assert r.exit_code == 0 and {d["name"] for d in json.loads(r.stdout)["recorded"]} == set(names), r.output
    assert verify("tiny", "--source", "hf")[0] == 0
    listed = [f["name"] for a in assets.load_catalog()["assets"] if a["key"] == "tiny" for f in a["files"]]
    assert (
        shard in listed and sha256(names[shard]["path"]) == hashlib.sha256(hub.hf["google/tiny-pg2"][shard]).hexdigest()
    )
    r = invoke("inspect", "tiny", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["config"] == "tiny-pg2-gqa", r.output


def test_kaggle_truncated_download_fails_in_one_line_and_resumes_next_run(hub, monkeypatch):
    import kagglehub.clients

    monkeypatch.setattr(kagglehub.clients, "CHUNK_SIZE", 16 << 10)  # whole chunks are kept: small ones, for a tiny file
    hub.truncate[NPZ] = 1
    r = invoke("assets", "download", "tiny")
    one_line_error(r, "tiny", "download from kaggle:google/tiny-pg2/jax/tiny-pg2-gqa failed")
    code, rep = verify("tiny")
    assert code == 1 and rep["assets"][0]["status"] == "incomplete", rep
    size = os.path.getsize(GOLDEN_NPZ)
    r = invoke("assets", "download", "tiny", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["status"] == "verified", r.output
    ranged = [q for q in hub.requests if q[0] == "GET" and q[2]]
    assert ranged and 0 < int(ranged[-1][2].split("=")[1].rstrip("-")) < size  # continued where it stopped
    assert verify("tiny")[0] == 0


def test_hash_mismatch(hub):
    r = invoke("assets", "download", "tiny-bad")
    one_line_error(r, "tiny-bad", "sha256 " + sha256(GOLDEN_NPZ), "the record says " + "0" * 64)
    code, rep = verify("tiny-bad")
    assert code == 1 and rep["assets"][0]["status"] == "mismatch"
    assert verify("tiny")[0] == 0  # the same file, recorded right


def test_not_found_404(hub, tmp_path):
    one_line_error(invoke("assets", "download", "tiny-gone"), "tiny-gone", "kaggle:google/tiny-pg2/jax/not-there")
    r = invoke("assets", "download", "tiny-gone", "--source", "hf")
    one_line_error(r, "tiny-gone", "google/not-there", "RepositoryNotFoundError")
    one_line_error(invoke("assets", "download", "tiny-typo"), "tiny-typo", "not a key", "did you mean")
    assert not any(p.name.startswith("not-there") for p in (tmp_path / "kaggle").rglob("*"))


def test_offline_cache_hit(hub, monkeypatch):
    import huggingface_hub.constants as c

    assert invoke("assets", "download", "tiny", "--source", "hf").exit_code == 0
    seen = len(hub.requests)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    r = invoke("assets", "download", "tiny", "--source", "hf", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["status"] == "unrecorded", r.output
    assert len(hub.requests) == seen  # served from the cache alone
    r = invoke("assets", "download", "tiny-gone", "--source", "hf")
    one_line_error(r, "tiny-gone", "google/not-there")


def test_unrecorded_is_never_verified_and_record_fills_it_in(hub):
    assert invoke("assets", "download", "tiny-unhashed").exit_code == 0
    code, rep = verify("tiny-unhashed")
    assert code == 1 and rep["assets"][0]["status"] == "unrecorded"
    assert "not verified" in invoke("assets", "verify", "tiny-unhashed").stdout
    before = assets.load_catalog()
    r = invoke("assets", "record", "tiny-unhashed", "--json")
    assert r.exit_code == 0, r.output
    after = assets.load_catalog()
    rec = next(f for a in after["assets"] if a["key"] == "tiny-unhashed" for f in a["files"] if f["name"] == NPZ)
    assert rec["sha256"] == sha256(GOLDEN_NPZ) and rec["size"] == os.path.getsize(GOLDEN_NPZ)
    assert [a for a in after["assets"] if a["key"] != "tiny-unhashed"] == [
        a for a in before["assets"] if a["key"] != "tiny-unhashed"
    ]
    assert verify("tiny-unhashed")[0] == 0
    assert sorted(os.listdir(hub.catalog.parent)).count("catalog.json") == 1
    assert not [p for p in os.listdir(hub.catalog.parent) if p.startswith(".catalog.json")]  # no temporary left
    # a recorded hash that differs is never overwritten
    text = hub.catalog.read_text()
    one_line_error(invoke("assets", "record", "tiny-bad", "--source", "kaggle"), "tiny-bad", "not changed")
    assert hub.catalog.read_text() == text


def test_output_dir_and_verify_all(hub, tmp_path):
    out = tmp_path / "mine"
    r = invoke("assets", "download", "tiny", "--output-dir", out, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["status"] == "verified", r.output
    assert filecmp.cmp(out / NPZ, GOLDEN_NPZ, shallow=False)
    assert verify("tiny", "--output-dir", out)[0] == 0
    assert verify("tiny")[0] == 1  # the caches hold nothing
    code, rep = verify("ALL")
    assert code == 1 and [a["key"] for a in rep["assets"]] == ["tiny", "tiny-unhashed", "tiny-bad", "tiny-gone"]


def test_tower_and_local_files_named_like_keys(hub, tmp_path, monkeypatch):
    doc = json.loads(hub.catalog.read_text())
    doc["assets"].append(
        {"key": "tower", "kind": "tower", "hf_id": "google/siglip-x", "kaggle": None, "variant": None,
         "params": None, "confirmed": {"hf_id": False}, "note": "", "files": []}
    )  # fmt: skip
    hub.catalog.write_text(assets.dump_catalog(doc))
    one_line_error(invoke("inspect", "tower"), "tower", "reference tower, not a PaliGemma checkpoint")
    monkeypatch.chdir(tmp_path)
    shutil.copy(GOLDEN_NPZ, tmp_path / "tiny")  # a file named like a key stays that file
    assert assets.is_key("tiny") is False
    r = invoke("inspect", "tiny", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["config"] == "tiny-pg2-gqa", r.output
