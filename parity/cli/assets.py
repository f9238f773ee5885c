"""`parity assets`: the released checkpoints by name (thin over parity/assets.py).

    parity assets list [--kind K] [--json]
    parity assets verify KEY|ALL [--source S] [--output-dir DIR] [--json]      exit 0 only when all verified
    parity assets download KEY [--source S] [--dtype D] [--output-dir DIR] [--json]
    parity assets record KEY [--source S] [--output-dir DIR] [--json]           fills in sha256 (maintainers)

Errors are ParityErrors (one line, exit 2) handled by the `parity` group; `verify` exits 1 when an asset asked for
is absent, incomplete, mismatching or has no recorded hash to check.
"""

from __future__ import annotations

import contextlib
import json
import sys

import click

from parity import assets as lib

NOT_VERIFIED = 1
SOURCE = click.option("--source", type=click.Choice(lib.SOURCES), default=None, help="Only this source (default: all).")
OUTPUT_DIR = click.option(
    "--output-dir", default=None, type=click.Path(file_okay=False), help="A directory instead of the hub caches."
)
JSON = click.option("--json", "as_json", is_flag=True, help="A JSON report on stdout.")


def _echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2))


@contextlib.contextmanager
def _hash_progress(enabled: bool):
    """Bytes hashed, on stderr when it is a terminal; yields a parity.assets.Progress callback or None."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    with Progress(
        TextColumn("sha256"), BarColumn(bar_width=20), DownloadColumn(), TextColumn("{task.fields[name]}"),
        console=Console(stderr=True), transient=True,
    ) as p:  # fmt: skip
        task = p.add_task("sha256", total=None, name="")
        yield lambda name, done, total: p.update(task, completed=done, total=total, name=name)


def _progress_enabled(as_json: bool) -> bool:
    return not as_json and sys.stderr.isatty()


@click.group("assets")
def assets():
    """The released PaliGemma / PaliGemma 2 checkpoints by key (`pg2-3b-224`): a key works wherever a checkpoint
    path does once its weights are downloaded."""


@assets.command("list")
@click.option("--kind", type=click.Choice(["paligemma", "tower"]), default=None, help="Only this kind.")
@JSON
def list_cmd(kind, as_json):
    """The catalog: key, variant, parameters, Hugging Face id, Kaggle handle, files."""
    rows = [a for a in lib.load_catalog()["assets"] if kind in (None, a["kind"])]
    if as_json:
        return _echo_json(rows)
    click.echo(f"{'key':<26} {'variant':<20} {'params':>14}  {'hf_id':<40} kaggle")
    for a in rows:
        unconfirmed = [k for k, v in a.get("confirmed", {}).items() if v is False]
        mark = f"  (unconfirmed: {', '.join(unconfirmed)})" if unconfirmed else ""
        params = f"{a['params']:,}" if a["params"] else "-"
        click.echo(
            f"{a['key']:<26} {a['variant'] or '(reference)':<20} {params:>14}  {a['hf_id']:<40} {a['kaggle'] or '-'}"
            + mark
        )
    hashed = sum(1 for a in rows for fr in a["files"] if fr.get("sha256"))
    click.echo(f"{len(rows)} assets ({lib.catalog_path()}); {hashed} files with a recorded sha256")


def _describe(rep: dict) -> str:
    srcs = "; ".join(
        f"{r['source']}: {r['status']}"
        + "".join(f", {f['name']} {f['status']}" + (f" ({f['detail']})" if f["detail"] else "") for f in r["files"])
        for r in rep["sources"]
        if r["status"] != "absent"
    )
    hint = {
        "absent": f" (parity assets download {rep['key']})",
        "unrecorded": " (no sha256 recorded, not verified; maintainers: parity assets record KEY)",
    }.get(rep["status"], "")
    return f"{rep['key']}: {rep['status']}{hint}" + (f" [{srcs}]" if srcs else "")


@assets.command("verify")
@click.argument("key")
@SOURCE
@OUTPUT_DIR
@JSON
@click.pass_context
def verify_cmd(ctx, key, source, output_dir, as_json):
    """Whether KEY (or ALL) is in the local caches, complete, and equal to its recorded sha256 (hashed streamed);
    never downloads. Exit 0 only when every asset asked for is verified."""
    keys = list(lib.assets()) if key == "ALL" else [lib.get(key)["key"]]
    reports = []
    with _hash_progress(_progress_enabled(as_json)) as cb:
        for k in keys:
            reports.append(lib.verify(k, output_dir, source, cb))
    ok = all(r["status"] == "verified" for r in reports)
    if as_json:
        _echo_json({"ok": ok, "assets": reports})
    else:
        for r in reports:
            click.echo(_describe(r))
    if not ok:
        ctx.exit(NOT_VERIFIED)


@assets.command("download")
@click.argument("key")
@SOURCE
@click.option("--dtype", default=None, help="Kaggle: which of the released npz files (float32, float16, bfloat16).")
@OUTPUT_DIR
@JSON
def download_cmd(key, source, dtype, output_dir, as_json):
    """Fetch KEY through huggingface_hub / kagglehub (their caches, or --output-dir), then check it: exit 2 when a
    file differs from its recorded sha256."""
    used = lib.download(key, source, output_dir, dtype, quiet=not _progress_enabled(as_json))
    with _hash_progress(_progress_enabled(as_json)) as cb:
        rep = lib.verify(key, output_dir, used, cb)
    if rep["status"] not in ("verified", "unrecorded"):
        bad = [f for f in rep["sources"][0]["files"] if f["status"] in ("mismatch", "incomplete")]
        what = f"{bad[0]['path']}: {bad[0]['detail']}" if bad else f"{key}: {rep['status']} after the download"
        raise lib.AssetError(f"{key}: downloaded, but {what}", key=key, file=bad[0]["path"] if bad else None)
    if as_json:
        return _echo_json(rep)
    click.echo(_describe(rep))


@assets.command("record")
@click.argument("key")
@SOURCE
@OUTPUT_DIR
@JSON
def record_cmd(key, source, output_dir, as_json):
    """Fill in the size and sha256 of KEY's downloaded files in the catalog (written atomically)."""
    with _hash_progress(_progress_enabled(as_json)) as cb:
        done = lib.record(key, source, output_dir, cb)
    if as_json:
        return _echo_json({"key": key, "catalog": lib.catalog_path(), "recorded": done})
    for d in done:
        click.echo(f"{key}: {d['source']} {d['name']}: {d['size']} bytes, sha256 {d['sha256']}")
    click.echo(f"recorded in {lib.catalog_path()}")
