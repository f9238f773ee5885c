"""The `parity` command: thin click wrappers over library functions users can import.

Every command takes --json (a machine-readable report on stdout); errors print one line on stderr and exit 2.
"""
from __future__ import annotations

import contextlib
import functools
import json
import sys

import click

from parity.errors import ParityError


def _emit(report: dict, as_json: bool, render) -> None:
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        render(report)


def handle_errors(fn):
    """Map ParityError (bad input, mismatched config, refused output) to one line on stderr and exit 2."""
    @functools.wraps(fn)
    def wrapper(*a, **k):
        try:
            return fn(*a, **k)
        except ParityError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
    return wrapper


@contextlib.contextmanager
def progress_bar(enabled: bool, label: str):
    """A rich progress bar on stderr (bytes), or nothing; yields a callback (done, total, key)."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.console import Console
    with Progress(TextColumn(label), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  TextColumn("{task.fields[key]}"), console=Console(stderr=True), transient=True) as p:
        task = p.add_task(label, total=None, key="")

        def cb(done, total, key):
            p.update(task, completed=done, total=total, key=key[-60:])
        yield cb


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="paligemma-parity")
def main():
    """paligemma-parity: prove a PaliGemma checkpoint means the same in every framework, format and device."""


@main.command()
@click.argument("src", type=click.Path())
@click.option("-o", "--output", "dst", required=True, type=click.Path(),
              help="Output .npz file, safetensors directory or orbax checkpoint directory.")
@click.option("--to", "to", required=True, type=click.Choice(["npz", "safetensors", "orbax"]))
@click.option("--config", default=None, help="Variant name or path of a config.json (default: sidecar/config.json, "
                                             "else detected from the shapes).")
@click.option("--dtype", default="keep", type=click.Choice(["keep", "float32", "bfloat16", "float16"]))
@click.option("--max-shard-size", default=None, help="Shard safetensors output, e.g. 2GB.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
@handle_errors
def convert(src, dst, to, config, dtype, max_shard_size, overwrite, as_json):
    """Convert SRC (npz, safetensors or orbax; detected) to --to format at -o, streaming block by block."""
    from converters.convert import convert as run
    with progress_bar(not as_json and sys.stderr.isatty(), "converting") as cb:
        report = run(src, dst, to, config=config, dtype=dtype, max_shard_size=max_shard_size,
                     overwrite=overwrite, progress=cb)

    def render(r):
        click.echo(f"{r['source']['format']} -> {r['destination']['format']}: {r['tensors']} tensors, "
                   f"{r['bytes'] / 1e6:.1f} MB, config {r['config']} ({r['config_source']}), {r['seconds']} s")
        for f in r["destination"]["files"]:
            click.echo(f"  wrote {f}")
        for n in r["notes"]:
            click.echo(f"  note: {n}")
    _emit(report, as_json, render)


@main.command()
@click.argument("path", type=click.Path())
@click.option("--config", default=None, help="Variant name or config.json to check against.")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def inspect(path, config, as_json):
    """Format, config, dtypes, parameter count, tensors, and every departure from the spec (exit 1 if any)."""
    from converters.inspect import inspect as run
    report = run(path, config)

    def render(r):
        from rich.console import Console
        from rich.table import Table
        con = Console()
        spec_n = f"{r['spec_parameters']:,}" if r["spec_parameters"] is not None else "unknown"
        con.print(f"[bold]{r['path']}[/bold]: {r['format']}, config [bold]{r['config']}[/bold] "
                  f"({r['config_source']}), dtypes {', '.join(r['dtypes'])}, {r['tensors']} tensors, "
                  f"{r['parameters']:,} parameters (spec: {spec_n})")
        t = Table("key", "shape", "dtype", "status")
        for row in r["tensors_table"]:
            t.add_row(row["key"], str(row["shape"]), row["dtype"], row["status"])
        con.print(t)
        for n in r["notes"]:
            con.print(f"note: {n}")
        for d in r["departures"]:
            con.print(f"[red]departure[/red]: {d['key']}: {d['what']} (expected {d['expected']}, found {d['found']})")
        con.print("conforms to the spec" if r["conforms"] else f"{len(r['departures'])} departures from the spec")
    _emit(report, as_json, render)
    sys.exit(0 if report["conforms"] else 1)


@main.command("inputs")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--prefix", "prefixes", multiple=True, required=True,
              help="Prompt per image (repeat the option; one value is used for every image).")
@click.option("--suffix", "suffixes", multiple=True, help="Target text per image (scoring); omit to generate.")
@click.option("--tokenizer", required=True, type=click.Path(exists=True, dir_okay=False),
              help="SentencePiece model (PaliGemma's tokenizer).")
@click.option("--config", required=True, help="Variant name or config.json (image size, vocabulary).")
@click.option("--resample", default="bilinear", type=click.Choice(["bilinear", "bicubic"]),
              help="bilinear ~ big_vision; bicubic = transformers' SiglipImageProcessor.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Inputs file (.npz or .safetensors).")
@click.option("--overwrite", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def make_inputs(images, prefixes, suffixes, tokenizer, config, resample, output, overwrite, as_json):
    """Build an inputs file from IMAGES and prompts: <bos> prefix \\n [suffix <eos>], right-padded."""
    from converters.checkpoint import resolve_config
    from parity.inputs import save_inputs
    from parity.processor import Tokenizer, build_inputs
    from parity.errors import InputsError
    n = len(images)
    prefixes = list(prefixes) * n if len(prefixes) == 1 else list(prefixes)
    if suffixes and len(suffixes) == 1:
        suffixes = list(suffixes) * n
    if len(prefixes) != n or (suffixes and len(suffixes) != n):
        raise InputsError(f"{n} images need 1 or {n} --prefix (got {len(prefixes)}) and 0, 1 or {n} --suffix "
                          f"(got {len(suffixes)})")
    batch = build_inputs(list(images), prefixes, list(suffixes) if suffixes else None,
                         tokenizer=Tokenizer(tokenizer), config=resolve_config(config), resample=resample)
    path = save_inputs(output, batch, overwrite=overwrite)
    report = {"output": str(path), **{k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in batch.items()},
              "text": batch["text"].tolist()}
    _emit(report, as_json, lambda r: click.echo(f"wrote {r['output']}: " + ", ".join(
        f"{k} {batch[k].dtype}{list(batch[k].shape)}" for k in batch)))


def _model_options(fn):
    """Options shared by the commands that run a model."""
    for opt in reversed([
        click.option("--impl", default="torch", type=click.Choice(["torch"]), help="Implementation to run."),
        click.option("--inputs", "inputs", required=True, type=click.Path(),
                     help="Inputs file (.npz/.safetensors): image, text, mask_ar[, mask_input]."),
        click.option("--convention", default="big_vision", type=click.Choice(["big_vision", "transformers"]),
                     help="Conventions preset (recorded in the output)."),
        click.option("--config", default=None, help="Variant name or config.json (default: detected)."),
        click.option("--dtype", default="float32", type=click.Choice(["float32", "bfloat16", "float16"])),
        click.option("--device", default="cpu", help="cpu, cuda or cuda:N."),
    ]):
        fn = opt(fn)
    return fn


@main.command()
@click.argument("ckpt", type=click.Path())
@_model_options
@click.option("--points", default=None, help="Comma-separated globs of capture points (default: all), e.g. "
                                             "'img/block0*/*,llm/layer*/out'. `logits` is always captured.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Capture file (.safetensors).")
@click.option("--overwrite", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def capture(ckpt, impl, inputs, convention, config, dtype, device, points, output, overwrite, as_json):
    """Run a forward pass of CKPT on --inputs and save the named capture points with a manifest."""
    from parity.run import capture as run
    m = run(ckpt, inputs, output, impl=impl, convention=convention, dtype=dtype, device=device, points=points,
            config=config, overwrite=overwrite)

    def render(r):
        click.echo(f"captured {len(r['points'])} points with {r['impl']} ({r['dtype']}, {r['device']}, "
                   f"convention {convention}) in {r['seconds']} s -> {r['output']}")
    _emit(m, as_json, render)


@main.command()
@click.argument("ckpt", type=click.Path())
@_model_options
@click.option("--max-new-tokens", required=True, type=int)
@click.option("--greedy/--sample", default=True, help="Greedy (default) or sampling.")
@click.option("--temperature", default=1.0, type=float)
@click.option("--top-k", default=None, type=int)
@click.option("--top-p", default=None, type=float)
@click.option("--seed", default=0, type=int)
@click.option("--tokenizer", default=None, type=click.Path(), help="SentencePiece model, to print text too.")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def generate(ckpt, impl, inputs, convention, config, dtype, device, max_new_tokens, greedy, temperature, top_k,
             top_p, seed, tokenizer, as_json):
    """Generate up to --max-new-tokens per row (prefill, then KV-cache decoding); stops at <eos>."""
    from parity.run import generate as run
    sampled = temperature != 1.0 or top_k is not None or top_p is not None
    r = run(ckpt, inputs, max_new_tokens, impl=impl, convention=convention, dtype=dtype, device=device,
            greedy=greedy and not sampled, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
            tokenizer=tokenizer, config=config)

    def render(r):
        for row in r["rows"]:
            click.echo(f"row {row['row']}: {row['tokens']}" + (f"  {row['text']!r}" if "text" in row else ""))
        m = r["manifest"]
        click.echo(f"({m['impl']}, {m['dtype']}, {m['device']}, convention {convention}, {m['seconds']} s)")
    _emit(r, as_json, render)


if __name__ == "__main__":
    main()
