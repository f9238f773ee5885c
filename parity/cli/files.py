"""`parity convert`, `inspect`, `inputs`, `points`: the commands on files (no model runs)."""

from __future__ import annotations

import sys

import click

from parity.backend import DTYPES
from parity.cli.base import _emit, _show_progress, main, progress_bar


@main.command()
@click.argument("src", type=click.Path())
@click.option(
    "-o",
    "--output",
    "dst",
    required=True,
    type=click.Path(),
    help="Output .npz file, safetensors directory or orbax checkpoint directory.",
)
@click.option("--to", "to", required=True, type=click.Choice(["npz", "safetensors", "orbax"]))
@click.option(
    "--config",
    default=None,
    help="Variant name or path of a config.json  [default: the npz sidecar / "
    "the directory's config.json, else detected from the shapes]",
)
@click.option(
    "--dtype",
    default="keep",
    type=click.Choice(["keep", *(d for d in DTYPES if d != "float64")]),  # checkpoints are stored in these
    help="Cast while converting (narrowing is reported as lossy).",
)
@click.option(
    "--max-shard-size", default=None, help="Shard safetensors output, e.g. 2GB, 500MB, 5GiB (> 0)  [default: one file]"
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
def convert(src, dst, to, config, dtype, max_shard_size, overwrite, as_json):
    """Convert SRC (npz, safetensors or orbax; detected) to --to format at -o, streaming block by block."""
    from converters.convert import convert as run

    with progress_bar(not as_json and _show_progress(), "converting") as cb:
        report = run(
            src, dst, to, config=config, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite, progress=cb
        )

    def render(r):
        click.echo(
            f"{r['source']['format']} -> {r['destination']['format']}: {r['tensors']} tensors, "
            f"{r['bytes'] / 1e6:.1f} MB, config {r['config']} ({r['config_source']}), {r['seconds']} s, "
            f"{'lossy' if r.get('lossy') else 'lossless'}"
        )
        for f in r["destination"]["files"]:
            click.echo(f"  wrote {f}")
        for n in r["notes"]:
            click.echo(f"  note: {n}")

    _emit(report, as_json, render)


@main.command()
@click.argument("path", type=click.Path())
@click.option(
    "--config",
    default=None,
    help="Variant name or config.json to check against  [default: found beside the file, else detected]",
)
@click.option("--verify", is_flag=True, help="Read every byte: CRC-32 of npz members, every value finite.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
@click.pass_context
def inspect(ctx, path, config, verify, as_json):
    """Format, config, dtypes, parameter count, tensors, and every departure from the spec (exit 1 if any)."""
    from converters.inspect import inspect as run
    from parity import estimate

    with progress_bar(verify and not as_json and sys.stderr.isatty(), "verifying") as cb:
        report = run(path, config, verify=verify, progress=cb)

    def render(r):
        from rich.console import Console
        from rich.table import Table

        con = Console()
        spec_n = f"{r['spec_parameters']:,}" if r["spec_parameters"] is not None else "unknown"
        pad = r.get("vocab_padding_parameters") or 0
        pad_n = f" + {pad:,} vocabulary padding" if pad else ""
        con.print(
            f"[bold]{r['path']}[/bold]: {r['format']}, config [bold]{r['config']}[/bold] "
            f"({r['config_source']}), dtypes {', '.join(r['dtypes'])}, {r['tensors']} tensors, "
            f"{r['parameters']:,} parameters (spec: {spec_n}{pad_n})"
        )
        t = Table("key", "shape", "dtype", "status")
        for row in r["tensors_table"]:
            t.add_row(row["key"], str(row["shape"]), row["dtype"], row["status"])
        con.print(t)
        for n in r["notes"]:
            con.print(f"note: {n}")
        for d in r["departures"]:
            con.print(f"[red]departure[/red]: {d['key']}: {d['what']} (expected {d['expected']}, found {d['found']})")
        con.print("conforms to the spec" if r["conforms"] else f"{len(r['departures'])} departures from the spec")
        for line in estimate.lines(r["memory"]) if r.get("memory") else []:
            con.print(line, highlight=False, markup=False, soft_wrap=True)

    _emit(report, as_json, render)
    ctx.exit(0 if report["conforms"] else 1)


@main.command("inputs")
@click.argument("images", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--prefix",
    "prefixes",
    multiple=True,
    help="Prompt per image (repeat the option; one value is used for every image).",
)
@click.option(
    "--suffix",
    "suffixes",
    multiple=True,
    help="Target text per image (scoring, training: writes mask_loss); omit to generate.",
)
@click.option(
    "--jsonl",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help='Training examples, one {"image", "prefix", "suffix"} object a line (big_vision\'s guide), instead of '
    "IMAGES and --prefix/--suffix.",
)
@click.option(
    "--image-dir",
    default=None,
    type=click.Path(exists=True, file_okay=False),
    help="Directory the --jsonl image names are relative to  [default: the JSONL file's directory]",
)
@click.option(
    "--tokenizer",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="SentencePiece model (PaliGemma's tokenizer).",
)
@click.option("--config", required=True, help="Variant name or config.json (image size, vocabulary).")
@click.option(
    "--resample",
    default="bilinear",
    type=click.Choice(["bilinear", "bicubic"]),
    help="bilinear ~ big_vision; bicubic = transformers' SiglipImageProcessor.",
)
@click.option("-o", "--output", required=True, type=click.Path(), help="Inputs file (.npz or .safetensors).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
def make_inputs(images, prefixes, suffixes, jsonl, image_dir, tokenizer, config, resample, output, overwrite, as_json):
    """Build an inputs file from IMAGES and prompts (or --jsonl): <bos> prefix \\n [suffix <eos>], right-padded;
    with suffixes, mask_loss marks the suffix and its <eos> (a training batch for `parity train-step`)."""
    from converters.checkpoint import resolve_config
    from parity.errors import InputsError, UsageError
    from parity.inputs import save_inputs
    from parity.processor import Tokenizer, build_inputs, read_jsonl

    if jsonl is not None:
        if images or prefixes or suffixes:
            raise UsageError("--jsonl replaces IMAGES, --prefix and --suffix; give one or the other")
        images, prefixes, suffixes = read_jsonl(jsonl, image_dir)
    elif image_dir is not None:
        raise UsageError("--image-dir goes with --jsonl")
    elif not images or not prefixes:
        raise UsageError("give IMAGES and --prefix (or --jsonl FILE)")
    n = len(images)
    prefixes = list(prefixes) * n if len(prefixes) == 1 else list(prefixes)
    if suffixes and len(suffixes) == 1:
        suffixes = list(suffixes) * n
    if len(prefixes) != n or (suffixes and len(suffixes) != n):
        raise InputsError(
            f"{n} images need 1 or {n} --prefix (got {len(prefixes)}) and 0, 1 or {n} --suffix (got {len(suffixes)})"
        )
    batch = build_inputs(
        list(images),
        prefixes,
        list(suffixes) if suffixes else None,
        tokenizer=Tokenizer(tokenizer),
        config=resolve_config(config),
        resample=resample,
    )
    path = save_inputs(output, batch, overwrite=overwrite)
    report = {
        "output": str(path),
        **{k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in batch.items()},
        "tokens": batch["text"].tolist(),
    }
    _emit(
        report,
        as_json,
        lambda r: click.echo(
            f"wrote {r['output']}: " + ", ".join(f"{k} {batch[k].dtype}{list(batch[k].shape)}" for k in batch)
        ),
    )


@main.command("points")
@click.argument("ckpt")
@click.option("--config", default=None, help="Variant name or config.json  [default: found beside CKPT, else detected]")
@click.option(
    "--inputs",
    default=None,
    type=click.Path(),
    help="Inputs file: concrete batch and text length [default: shapes in letters B, L]",
)
@click.option(
    "--max-new-tokens",
    default=None,
    type=click.IntRange(min=1),
    help="Cache length of the generation points  [default: the letter N]",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
def list_points(ckpt, config, inputs, max_new_tokens, as_json):
    """Every capture point of CKPT's config (a checkpoint, or a variant name) with its shape."""
    from parity.run import list_points as run

    report = run(ckpt, config=config, inputs=inputs, max_new_tokens=max_new_tokens)

    def render(r):
        click.echo(f"{len(r['points'])} points of {r['config']} (B batch, L text length, N new tokens):")
        width = max(len(p["name"]) for p in r["points"])
        for p in r["points"]:
            shape = "[" + ", ".join(map(str, p["shape"])) + "]"
            click.echo(f"  {p['name']:<{width}}  {shape:<24} {p['when']}")

    _emit(report, as_json, render)
