"""The released checkpoints by name: a checked-in catalog (parity/assets_catalog.json), where each one is in the
local hub caches, its sha256 checked, downloads through the hubs' own clients, and short keys (`pg2-3b-224`) that
work wherever a checkpoint path does (converters/hub.py resolves them here).

An asset has two sources, either of which makes it present: `hf` (the transformers-format repo: config.json,
model.safetensors.index.json and the shards that index names, all required) and `kaggle` (big_vision's npz; the
files of a variation with a `dtype` are alternatives: the same weights in float32 / float16 / bfloat16, any one
complete makes the source complete). Nothing here downloads except `download`; `locate` and `verify` read the
caches only: huggingface_hub's (HF_HUB_CACHE) and kagglehub's (KAGGLEHUB_CACHE), or an `--output-dir`.

`verified` means every file of a complete source has a recorded sha256 and the file's streamed sha256 equals it.
Where no hash is recorded the status says so (`unrecorded`), never verified. `PARITY_ASSETS_CATALOG` points at
another catalog file (tests, a private mirror).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable

from parity.errors import ParityError

CATALOG_ENV = "PARITY_ASSETS_CATALOG"
DEFAULT_CATALOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets_catalog.json")
SOURCES = ("hf", "kaggle")
INDEX = "model.safetensors.index.json"
Progress = Callable[[str, int, int], None]  # (file name, bytes done, bytes total)


class AssetError(ParityError):
    """An unknown key, a malformed catalog, a failed download, a file that does not match its record."""


def catalog_path() -> str:
    return os.environ.get(CATALOG_ENV) or DEFAULT_CATALOG


def load_catalog(path: str | None = None) -> dict:
    """The catalog document, checked: every asset has a unique key, the fields `list --json` promises, and files
    naming a known source."""
    path = path or catalog_path()
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise AssetError(f"{path}: cannot read the asset catalog ({e})", file=path) from None
    seen = set()
    for i, a in enumerate(doc.get("assets", []) if isinstance(doc, dict) else [None]):
        missing = [k for k in ("key", "kind", "hf_id", "kaggle", "variant", "params", "files") if k not in (a or {})]
        if missing or a["key"] in seen:
            what = f"missing {', '.join(missing)}" if missing else f"duplicate key {a['key']!r}"
            raise AssetError(f"{path}: asset #{i}: {what}", file=path)
        seen.add(a["key"])
        for fr in a["files"]:
            if fr.get("source") not in SOURCES or not fr.get("name"):
                raise AssetError(f"{path}: asset {a['key']!r}: a file needs a name and a source in {SOURCES}")
    return doc


def assets(path: str | None = None) -> dict[str, dict]:
    return {a["key"]: a for a in load_catalog(path)["assets"]}


def get(key: str, path: str | None = None) -> dict:
    cat = assets(path)
    if key not in cat:
        near = difflib.get_close_matches(key, list(cat), n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else "; `parity assets list` shows them"
        raise AssetError(f"{key}: not a key of the asset catalog {catalog_path()}{hint}", key=key)
    return cat[key]


def is_key(src) -> bool:
    """A catalog key, not an existing path (a file named like a key stays a file)."""
    if not isinstance(src, str) or os.path.exists(src) or os.sep in src or ":" in src:
        return False
    return src in assets()


def dump_catalog(doc: dict) -> str:
    """The catalog's text: one field per line, one file record per line (diffs stay readable)."""
    ents = []
    for a in doc["assets"]:
        head = ",\n".join(f"   {json.dumps(k)}: {json.dumps(v)}" for k, v in a.items() if k != "files")
        files = ",\n".join(f"    {json.dumps(x)}" for x in a["files"])
        ents.append("  {\n" + head + ',\n   "files": [\n' + files + "\n   ]\n  }")
    top = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in doc.items() if k != "assets")
    return "{\n" + top + ',\n "assets": [\n' + ",\n".join(ents) + "\n ]\n}\n"


def save_catalog(doc: dict, path: str | None = None) -> None:
    """Write atomically (a temporary beside it, flushed, renamed over): a reader sees the old or the new file."""
    from converters.atomic import atomic_output

    path = path or catalog_path()
    text = dump_catalog(doc)
    assert json.loads(text) == doc
    with atomic_output(path, False, overwrite=True) as tmp, open(tmp, "w") as f:
        f.write(text)


# -- where the files are --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Located:
    source: str
    name: str
    path: str | None  # None: absent
    record: dict  # the catalog's record (size, sha256 may be None)
    status: str = "absent"  # absent | incomplete | present | verified | unrecorded | mismatch
    size: int | None = None
    sha256: str | None = None
    detail: str = ""

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("source", "name", "path", "status", "size", "sha256", "detail")}
        return d | {"expected_size": self.record.get("size"), "expected_sha256": self.record.get("sha256")}


def hf_cache_dir() -> str:
    import huggingface_hub.constants as c

    return c.HF_HUB_CACHE


def kaggle_cache_dir() -> str:
    from kagglehub.config import get_cache_folder

    return get_cache_folder()


def _hf_find(asset: dict, name: str, output_dir: str | None) -> str | None:
    if output_dir:
        p = os.path.join(output_dir, name)
        return p if os.path.isfile(p) else None
    from huggingface_hub import try_to_load_from_cache

    p = try_to_load_from_cache(asset["hf_id"], name, cache_dir=hf_cache_dir(), revision=asset.get("revision"))
    return p if isinstance(p, str) and os.path.isfile(p) else None


def _kaggle_handle(asset: dict) -> str:
    return asset["kaggle"].removeprefix("kaggle:")


def _kaggle_find(asset: dict, name: str, output_dir: str | None) -> tuple[str | None, bool]:
    """(path, complete): kagglehub's own cache layout and completion markers (a partial download has a file but
    no marker). An unversioned handle takes the newest version found."""
    from kagglehub.cache import FILE_COMPLETION_MARKER_FOLDER, Cache
    from kagglehub.handle import parse_model_handle

    h = parse_model_handle(_kaggle_handle(asset))
    cache = Cache(override_dir=output_dir)
    versions = [h.version] if h.is_versioned() else []
    if not versions:
        sub = ["models", h.owner, h.model, h.framework, h.variation]
        base = os.path.join(output_dir, FILE_COMPLETION_MARKER_FOLDER, *sub) if output_dir else None
        base = base or os.path.join(kaggle_cache_dir(), *sub)
        found = os.listdir(base) if os.path.isdir(base) else []
        versions = sorted((int(v) for v in found if v.isdigit()), reverse=True)
    for v in versions:
        done = cache.load_from_cache(h.with_version(v), name)
        if done:
            return done, True
    partial = cache.get_path(h.with_version(versions[0]), name) if versions else None
    if output_dir:
        partial = os.path.join(output_dir, name)
    return (partial, False) if partial and os.path.isfile(partial) else (None, False)


def hf_names(asset: dict, output_dir: str | None = None) -> list[dict]:
    """The hf file records: the listed ones, then the shards the index names (when the index is here to say)."""
    recs = [fr for fr in asset["files"] if fr["source"] == "hf"]
    idx = next((fr for fr in recs if fr["name"] == INDEX), None)
    p = _hf_find(asset, INDEX, output_dir) if idx else None
    if p:
        try:
            with open(p) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise AssetError(f"{p}: not a safetensors index ({type(e).__name__}: {e})", file=p) from None
        known = {fr["name"] for fr in recs}
        recs += [{"source": "hf", "name": s, "size": None, "sha256": None} for s in shards if s not in known]
    return recs


def locate(asset: dict, source: str, output_dir: str | None = None) -> list[Located]:
    """The files of one source of `asset` and whether each is here (absent / incomplete / present)."""
    out = []
    if source == "hf":
        for fr in hf_names(asset, output_dir):
            p = _hf_find(asset, fr["name"], output_dir)
            out.append(Located("hf", fr["name"], p, fr, "present" if p else "absent"))
    elif asset.get("kaggle"):
        for fr in (fr for fr in asset["files"] if fr["source"] == "kaggle"):
            p, done = _kaggle_find(asset, fr["name"], output_dir)
            out.append(Located("kaggle", fr["name"], p, fr, "present" if done else ("incomplete" if p else "absent")))
    for loc in out:
        if loc.path:
            loc.size = os.path.getsize(loc.path)
            want = loc.record.get("size")
            if want is not None and loc.size != want:
                loc.status, loc.detail = "incomplete", f"{loc.size} bytes, the record says {want}"
    return out


def complete(asset: dict, locs: list[Located]) -> list[Located]:
    """The files that make the source usable, or [] when it is not: every hf file, with at least one shard when
    an index is listed; one complete kaggle alternative (the first listed that is present)."""
    if not locs:
        return []
    if locs[0].source == "hf":
        shards = INDEX not in {loc.name for loc in locs} or any(loc.name.endswith(".safetensors") for loc in locs)
        return locs if shards and all(loc.status == "present" for loc in locs) else []
    return next(([loc] for loc in locs if loc.status == "present"), [])


# -- hashes ---------------------------------------------------------------------------------------------------------
def sha256_file(path: str, progress: Progress | None = None, chunk: int = 8 << 20) -> str:
    """Streamed (constant memory), reporting bytes done."""
    h = hashlib.sha256()
    total = os.path.getsize(path)
    done = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            done += len(block)
            if progress:
                progress(os.path.basename(path), done, total)
    return h.hexdigest()


def check_hashes(locs: list[Located], progress: Progress | None = None) -> None:
    """Sets each present file's status: verified, mismatch or unrecorded (no sha256 recorded: not checked)."""
    for loc in locs:
        if loc.status != "present":
            continue
        want = loc.record.get("sha256")
        if want is None:
            loc.status, loc.detail = "unrecorded", "no sha256 recorded: not verified"
            continue
        loc.sha256 = sha256_file(loc.path, progress)
        if loc.sha256 == want:
            loc.status = "verified"
        else:
            loc.status, loc.detail = "mismatch", f"sha256 {loc.sha256}, the record says {want}"


def verify(
    key: str, output_dir: str | None = None, source: str | None = None, progress: Progress | None = None
) -> dict:
    """A report for one asset: per source, its files and their status; `status` of the asset: `verified` (a
    complete source, every file's sha256 recorded and equal), `mismatch`, `unrecorded` (complete, but some hash is
    not recorded), `incomplete` or `absent`. Reads the caches only."""
    asset = get(key)
    rows, best = [], "absent"
    rank = ["absent", "incomplete", "unrecorded", "verified", "mismatch"]  # a mismatch anywhere is the answer
    for src in [source] if source else SOURCES:
        locs = locate(asset, src, output_dir)
        use = complete(asset, locs)
        check_hashes(use, progress)
        if use:
            states = {loc.status for loc in use}
            st = "mismatch" if "mismatch" in states else "unrecorded" if "unrecorded" in states else "verified"
        else:
            st = "incomplete" if any(loc.path for loc in locs) else "absent"
        rows.append({"source": src, "status": st, "files": [loc.to_dict() for loc in locs]})
        best = max(best, st, key=rank.index)
    return {"key": key, "hf_id": asset["hf_id"], "kaggle": asset["kaggle"], "status": best, "sources": rows}


def record(key: str, source: str | None = None, output_dir: str | None = None, progress: Progress | None = None):
    """Fill in size and sha256 of the downloaded files of `key` (a maintainer's step) and save the catalog. A
    recorded hash that differs is an error: the catalog is never changed silently. Returns the files recorded."""
    doc = load_catalog()
    asset = next(a for a in doc["assets"] if a["key"] == get(key)["key"])
    done = []
    for src in [source] if source else SOURCES:
        use = complete(asset, locate(asset, src, output_dir))
        for loc in use:
            digest = sha256_file(loc.path, progress)
            rec = next((fr for fr in asset["files"] if fr["source"] == src and fr["name"] == loc.name), None)
            if rec is None:  # a shard named by the index
                rec = {"source": src, "name": loc.name, "size": None, "sha256": None}
                asset["files"].append(rec)
            if rec.get("sha256") not in (None, digest):
                raise AssetError(
                    f"{loc.path}: sha256 {digest}, but the catalog records {rec['sha256']} for {key} {loc.name}; "
                    "not changed (a different file, or a new release: edit the catalog by hand)",
                    file=loc.path,
                )
            rec["size"], rec["sha256"] = loc.size, digest
            done.append({"source": src, "name": loc.name, "size": loc.size, "sha256": digest})
    if not done:
        raise AssetError(f"{key}: nothing downloaded to record; run `parity assets download {key}` first", key=key)
    save_catalog(doc)
    return done


# -- a key as a checkpoint ------------------------------------------------------------------------------------------
def checkpoint_path(key: str) -> str:
    """The local checkpoint of a catalog key: a complete kaggle npz, else a complete hf snapshot directory. Not
    hashed here (`parity assets verify` does that); not downloaded (exit 2 naming the command that does)."""
    asset = get(key)
    if asset["kind"] != "paligemma":
        raise AssetError(f"{key}: {asset['hf_id']} is a reference tower, not a PaliGemma checkpoint", key=key)
    for src in ("kaggle", "hf"):
        use = complete(asset, locate(asset, src))
        if use:
            return use[0].path if src == "kaggle" else os.path.dirname(use[0].path)
    raise AssetError(
        f"{key} ({asset['hf_id']}, {asset['kaggle']}, variant {asset['variant']}, {asset['params']:,} parameters): "
        f"the weights are not downloaded (looked in {hf_cache_dir()} and {kaggle_cache_dir()}); "
        f"run `parity assets download {key}`",
        key=key,
    )


# -- downloads ------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _kagglehub_logs_to_stderr():
    """kagglehub logs to stdout; a `--json` report owns stdout."""
    moved = []
    log = logging.getLogger("kagglehub")
    for h in log.handlers:
        if isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.__stdout__):
            moved.append((h, h.setStream(sys.stderr)))
    try:
        yield
    finally:
        for h, old in moved:
            h.setStream(old)


@contextlib.contextmanager
def _quiet(enabled: bool):
    """No progress bars or INFO lines from the clients (stderr not a terminal, or a --json run): the one line of an
    error stays the only line. tqdm writes to the sys.stderr of the moment a bar starts."""
    if not enabled:
        yield
        return
    import io

    log = logging.getLogger("kagglehub")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        log.setLevel(level)


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def download(
    key: str, source: str | None = None, output_dir: str | None = None, dtype: str | None = None, quiet: bool = False
) -> str:
    """Fetch the files of one source of `key` through its hub's client (resumable as that client is: kagglehub
    resumes a partial file on the next run; huggingface_hub resumes within a run). Returns the source used."""
    asset = get(key)
    source = source or ("kaggle" if asset.get("kaggle") else "hf")
    if source == "kaggle" and not asset.get("kaggle"):
        raise AssetError(f"{key}: no Kaggle handle in the catalog; use --source hf", key=key)
    try:
        with _quiet(quiet):
            _fetch(asset, source, output_dir, dtype)
    except ImportError as e:
        raise AssetError(f"{key}: needs the hub clients: pip install 'paligemma-parity[hub]' ({e})") from None
    except AssetError:
        raise
    except Exception as e:  # the clients raise many types (HTTP 404, offline, connection): one line
        where = asset["hf_id"] if source == "hf" else asset["kaggle"]
        raise AssetError(f"{key}: download from {where} failed ({_one_line(e)})", key=key) from None
    return source


def _fetch(asset: dict, source: str, output_dir: str | None, dtype: str | None) -> None:
    """One source's files through its client: hf lists, then the shards the index names; kaggle one npz."""
    key = asset["key"]
    if source == "hf":
        from huggingface_hub import hf_hub_download

        kw = dict(revision=asset.get("revision"), endpoint=os.environ.get("HF_ENDPOINT") or None)
        kw |= dict(local_dir=output_dir) if output_dir else dict(cache_dir=hf_cache_dir())
        names = [fr["name"] for fr in asset["files"] if fr["source"] == "hf"]
        for name in names:
            hf_hub_download(asset["hf_id"], name, **kw)
        for fr in hf_names(asset, output_dir):
            if fr["name"] not in names:
                hf_hub_download(asset["hf_id"], fr["name"], **kw)
    else:
        import kagglehub

        alts = [fr for fr in asset["files"] if fr["source"] == "kaggle"]
        pick = [fr for fr in alts if dtype in (None, fr.get("dtype"))][:1]
        if not pick:
            have = ", ".join(str(fr.get("dtype")) for fr in alts)
            raise AssetError(f"{key}: no Kaggle file in {dtype} (the catalog has {have})", key=key)
        with _kagglehub_logs_to_stderr():
            kagglehub.model_download(_kaggle_handle(asset), pick[0]["name"], output_dir=output_dir)
