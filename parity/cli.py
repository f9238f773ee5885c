"""The `parity` command: thin click wrappers over library functions users can import.

Every command takes --json (a machine-readable report on stdout). Every error is one line on stderr and exit
status 2 (bad input, bad option, contradicting options); with --json it is also a JSON object on stdout,
{"error": {"kind", "message", "file", "key"}}. Ctrl-C prints one line and exits with status 130. Long work shows
progress on stderr when it is a terminal.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading

import click

from parity.assets_cli import assets
from parity.conventions import PRESETS
from parity.errors import ParityError

INTERRUPTED = 130


def _emit(report: dict, as_json: bool, render) -> None:
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        render(report)


def _fail(kind: str, message: str, as_json: bool, file=None, key=None) -> None:
    message = " ".join(str(message).split())  # one line, whatever the message held
    click.echo(f"error: {message}", err=True)
    if as_json:
        click.echo(json.dumps({"error": {"kind": kind, "message": message, "file": file, "key": key}}))


def jax_compile_cache_default() -> str | None:
    """Give jax runs of the `parity` command a persistent XLA compilation cache (every compilation kept, however
    short), unless the user configured one: a tiny `golden check --impl jax` is then compiled once per machine
    instead of once per process. Set through jax's own environment variables before jax is imported (so the
    compare worker processes inherit it); `JAX_COMPILATION_CACHE_DIR=` (empty) turns it off. Returns the directory
    or None."""
    if "jax" in sys.modules or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return os.environ.get("JAX_COMPILATION_CACHE_DIR") or None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(base, "parity", "jax-compile")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    return path


class ParityGroup(click.Group):
    """Maps every failure to one line (and a JSON error object under --json) with a meaningful exit status:
    2 for bad input and bad options, 130 for Ctrl-C."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if args is None:  # the `parity` command itself (not an embedding program, not click's test runner)
            jax_compile_cache_default()
        argv = list(sys.argv[1:] if args is None else args)
        as_json = "--json" in argv
        try:
            rv = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else 0
        except click.UsageError as e:
            hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
            _fail("UsageError", e.format_message() + hint, as_json)
            code = 2
        except click.ClickException as e:
            _fail(type(e).__name__, e.format_message(), as_json)
            code = e.exit_code
        except ParityError as e:
            _fail(type(e).__name__, str(e), as_json, e.file, e.key)
            code = e.exit_code
        except (KeyboardInterrupt, click.exceptions.Abort):
            _fail("Interrupted", "interrupted (Ctrl-C); nothing was written", as_json)
            code = INTERRUPTED
        if not standalone_mode:
            return code
        sys.exit(code)

    def __call__(self, *args, **kwargs):
        """The console entry point. After Ctrl-C a worker may still sit in one long native operation; leave at
        once rather than wait for it (its outputs are temporary names, never the destination)."""
        try:
            return self.main(*args, **kwargs)
        except SystemExit as e:
            if e.code == INTERRUPTED and any(t.name == "parity-run" and t.is_alive() for t in threading.enumerate()):
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(INTERRUPTED)
            raise


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _show_progress() -> bool:
    return sys.stderr.isatty()


@contextlib.contextmanager
def progress_bar(enabled: bool, label: str, console=None):
    """A byte progress bar on stderr that fits the terminal (80 columns and up: the key is cut to fit), or nothing;
    yields a callback (done, total, key)."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Column

    with Progress(
        TextColumn(label),
        BarColumn(bar_width=20),
        DownloadColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[key]}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
        console=console or _console(),
        transient=True,
    ) as p:
        task = p.add_task(label, total=None, key="")

        def cb(done, total, key):
            p.update(task, completed=done, total=total, key=key)

        yield cb


_STAGES = {
    "loading": "loading checkpoint",
    "building": "building model",
    "hashing": "hashing files",
    "forward": "forward pass",
    "decoding": "decoding",
    "writing": "writing output",
}
_UNITS = {"forward": "blocks", "decoding": "tokens"}


@contextlib.contextmanager
def stage_progress(enabled: bool, console=None):
    """Progress of a model run on stderr: loading (bytes), building, forward (blocks), decoding (tokens), writing;
    yields a parity.run.Progress callback, or None."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Column

    with Progress(
        TextColumn("{task.description}", table_column=Column(width=18)),
        BarColumn(bar_width=20),
        TextColumn("{task.fields[detail]}", table_column=Column(no_wrap=True, overflow="ellipsis")),
        TimeElapsedColumn(),
        console=console or _console(),
        transient=True,
    ) as p:
        task = p.add_task("preparing", total=None, detail="")

        def cb(stage, done, total):
            if stage == "loading" and total:
                detail = f"{done / 1e6:,.1f}/{total / 1e6:,.1f} MB"
            elif done is not None:
                detail = f"{done}/{total if total is not None else '?'} {_UNITS.get(stage, '')}".strip()
            else:
                detail = ""
            p.update(task, description=_STAGES.get(stage, stage), completed=done or 0, total=total, detail=detail)

        yield cb


CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 110}


@click.group(cls=ParityGroup, context_settings=CONTEXT)
@click.version_option(package_name="paligemma-parity")
def main():
    """paligemma-parity: prove a PaliGemma checkpoint means the same in every framework, format and device."""


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
    type=click.Choice(["keep", "float32", "bfloat16", "float16"]),
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

    _emit(report, as_json, render)
    ctx.exit(0 if report["conforms"] else 1)


@main.command("inputs")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--prefix",
    "prefixes",
    multiple=True,
    required=True,
    help="Prompt per image (repeat the option; one value is used for every image).",
)
@click.option("--suffix", "suffixes", multiple=True, help="Target text per image (scoring); omit to generate.")
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
def make_inputs(images, prefixes, suffixes, tokenizer, config, resample, output, overwrite, as_json):
    """Build an inputs file from IMAGES and prompts: <bos> prefix \\n [suffix <eos>], right-padded."""
    from converters.checkpoint import resolve_config
    from parity.errors import InputsError
    from parity.inputs import save_inputs
    from parity.processor import Tokenizer, build_inputs

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


def _model_options(fn):
    """Options shared by the commands that run a model."""
    from parity.run import DTYPES, IMPLS

    for opt in reversed(
        [
            click.option("--impl", default="torch", type=click.Choice(list(IMPLS)), help="Implementation to run."),
            click.option(
                "--inputs",
                "inputs",
                required=True,
                type=click.Path(),
                help="Inputs file (.npz/.safetensors): image, text, mask_ar[, mask_input].",
            ),
            click.option(
                "--convention",
                default="big_vision",
                type=click.Choice(list(PRESETS)),
                help="Conventions preset (recorded in the output).",
            ),
            click.option(
                "--set",
                "settings",
                multiple=True,
                metavar="NAME=VALUE",
                help="Change one convention on top of the preset, e.g. --set position_origin=1 (repeatable; "
                "names: position_origin, final_softcap, sliding_window, attn_softcap, normalizer_dtype).",
            ),
            click.option(
                "--config",
                default=None,
                help="Variant name or config.json  [default: found beside CKPT, else detected]",
            ),
            click.option(
                "--dtype",
                default="float32",
                type=click.Choice(list(DTYPES)),
                help="Parameter dtype (values rounded to it) and, unless --compute-dtype, compute dtype.",
            ),
            click.option(
                "--compute-dtype",
                default=None,
                type=click.Choice(list(DTYPES)),
                help="Compute in this dtype with the --dtype parameter values (e.g. bf16 weights computed "
                "in float32 on a CPU without fast bf16)  [default: --dtype]",
            ),
            click.option(
                "--device",
                default="cpu",
                help="Device of the implementation (torch: cpu, cuda, cuda:N; jax: cpu, gpu, tpu[:N]).",
            ),
            click.option(
                "--precision",
                default="highest",
                type=click.Choice(["highest", "high", "default"]),
                help="float32 matmul precision (recorded in the manifest).",
            ),
            click.option(
                "--mesh",
                default=None,
                help="jax: shard over a device mesh, e.g. data=2,model=4 (params "
                "fsdp/tensor-parallel, activations along data)  [default: none]",
            ),
        ]
    ):
        fn = opt(fn)
    return fn


def _warnings(bucket: list[str]):
    def warn(msg: str) -> None:
        bucket.append(msg)
        click.echo(f"warning: {msg}", err=True)

    return warn


def _conventions_line(convention: str, settings) -> str:
    return f"convention {convention}" + (f" with {', '.join(settings)}" if settings else "")


@main.command()
@click.argument("ckpt", type=click.Path())
@_model_options
@click.option(
    "--points",
    default=None,
    help="Comma-separated globs of capture points, e.g. "
    "'img/block0*/*,llm/layer*/out'; each must match (`parity points "
    "CKPT` lists them). `logits` is always captured  [default: all]",
)
@click.option("-o", "--output", required=True, type=click.Path(), help="Capture file (.safetensors).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report (the manifest).")
def capture(
    ckpt,
    impl,
    inputs,
    convention,
    settings,
    config,
    dtype,
    compute_dtype,
    device,
    precision,
    mesh,
    points,
    output,
    overwrite,
    as_json,
):
    """Run a forward pass of CKPT on --inputs and save the named capture points with a manifest."""
    from parity.run import capture as run
    from parity.run import interruptible

    warnings: list[str] = []
    with stage_progress(_show_progress()) as progress:
        m = interruptible(
            run,
            ckpt,
            inputs,
            output,
            impl=impl,
            convention=convention,
            dtype=dtype,
            device=device,
            points=points,
            config=config,
            overwrite=overwrite,
            settings=settings,
            compute_dtype=compute_dtype,
            progress=progress,
            warn=_warnings(warnings),
            precision=precision,
            mesh=mesh,
        )
    m["warnings"] = warnings

    def render(r):
        click.echo(
            f"captured {len(r['points'])} points with {r['impl']} ({r['dtype']}"
            f"{'' if r['compute_dtype'] == r['dtype'] else ', computed in ' + r['compute_dtype']}, "
            f"{r['device']}, {_conventions_line(convention, settings)}) -> {r['output']}"
        )
        click.echo(f"  load {r['load_seconds']} s, forward {r['run_seconds']} s, total {r['seconds']} s")

    _emit(m, as_json, render)


@main.command()
@click.argument("ckpt", type=click.Path())
@_model_options
@click.option("--max-new-tokens", required=True, type=click.IntRange(min=1), help="Tokens to generate per row.")
@click.option(
    "--greedy/--sample",
    default=None,
    help="Greedy decoding, or sampling; --temperature, --top-k and --top-p imply --sample  [default: greedy]",
)
@click.option(
    "--temperature",
    default=None,
    type=click.FloatRange(min=0, min_open=True),
    show_default=False,
    help="Sampling temperature (> 0)  [default: 1.0 when sampling]",
)
@click.option(
    "--top-k",
    default=None,
    type=click.IntRange(min=1),
    show_default=False,
    help="Sample among the K most likely tokens  [default: off]",
)
@click.option(
    "--top-p",
    default=None,
    type=click.FloatRange(min=0, max=1, min_open=True),
    show_default=False,
    help="Sample among the smallest set of tokens with probability mass >= P  [default: off]",
)
@click.option("--seed", default=0, type=click.IntRange(0, 2**63 - 1), help="Sampling seed.")
@click.option("--tokenizer", default=None, type=click.Path(), help="SentencePiece model, to print text too.")
@click.option(
    "-o",
    "--output",
    default=None,
    type=click.Path(),
    help="Also save tokens and step logits with the manifest (.safetensors).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--ignore-eos", is_flag=True, help="Decode exactly --max-new-tokens per row, through <eos>.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report (rows and manifest).")
def generate(
    ckpt,
    impl,
    inputs,
    convention,
    settings,
    config,
    dtype,
    compute_dtype,
    device,
    precision,
    mesh,
    max_new_tokens,
    greedy,
    temperature,
    top_k,
    top_p,
    seed,
    tokenizer,
    output,
    overwrite,
    ignore_eos,
    as_json,
):
    """Generate up to --max-new-tokens per row (prefill, then KV-cache decoding); stops at <eos>."""
    from parity.run import generate as run
    from parity.run import interruptible

    if greedy is None:
        greedy = temperature is None and top_k is None and top_p is None
    warnings: list[str] = []
    with stage_progress(_show_progress()) as progress:
        r = interruptible(
            run,
            ckpt,
            inputs,
            max_new_tokens,
            impl=impl,
            convention=convention,
            dtype=dtype,
            device=device,
            greedy=greedy,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            tokenizer=tokenizer,
            config=config,
            output=output,
            overwrite=overwrite,
            settings=settings,
            compute_dtype=compute_dtype,
            progress=progress,
            warn=_warnings(warnings),
            precision=precision,
            mesh=mesh,
            ignore_eos=ignore_eos,
        )
    r["manifest"]["warnings"] = warnings

    def render(r):
        for row in r["rows"]:
            click.echo(f"row {row['row']}: {row['tokens']}" + (f"  {row['text']!r}" if "text" in row else ""))
        m = r["manifest"]
        click.echo(
            f"({m['impl']}, {m['dtype']}, {m['device']}, {_conventions_line(convention, settings)}; "
            f"load {m['load_seconds']} s, generate {m['run_seconds']} s)"
        )
        if "output" in m:
            click.echo(f"wrote {m['output']}")

    _emit(r, as_json, render)


# -- parity compare (issue 7): a thin wrapper over parity.compare -------------------------------------------------
@main.command("compare")
@click.argument("ckpt", required=False, type=click.Path())
@click.option(
    "--a",
    "side_a",
    default=None,
    help="Side A (the reference): IMPL[:DEVICE][:DTYPE][:PRECISION] run "
    "on CKPT (e.g. torch, torch:cuda:bfloat16, transformers) or a "
    "capture file.",
)
@click.option("--b", "side_b", default=None, help="Side B: same forms as --a.")
@click.option(
    "--against",
    default=None,
    type=click.Path(),
    help="CKPT_B: compare CKPT (side A) against it, both run with --impl (e.g. before / after a conversion).",
)
@click.option("--impl", default="torch", help="Implementation of the --against sides (default torch).")
@click.option(
    "--inputs",
    default=None,
    type=click.Path(),
    help="Inputs file the run sides use (also locates the padding positions of capture-file sides).",
)
@click.option(
    "--convention",
    default=None,
    type=click.Choice(list(PRESETS)),
    help="Conventions preset of the run sides (default: transformers if a side is, else big_vision).",
)
@click.option("--config", default=None, help="Variant name or config.json (default: detected).")
@click.option("--layer-by-layer", is_flag=True, help="Compare every capture point, not only the logits.")
@click.option(
    "--teacher-forced",
    is_flag=True,
    help="Also run each block of side B on side A's input to it (local error beside propagated error).",
)
@click.option("--points", default=None, help="Comma-separated globs of the points to compare.")
@click.option(
    "--profile",
    default=None,
    type=click.Choice(["fp32", "tf32", "f16", "bf16"]),
    help="Tolerance profile (default: chosen from the two manifests).",
)
@click.option("--policy", default=None, type=click.Path(), help="Policy file (TOML or JSON): per-point rules.")
@click.option("--allow-convention-mismatch", is_flag=True, help="Compare sides run under different conventions.")
@click.option("--save", default=None, type=click.Path(), help="Save the comparison (JSON) for --rejudge.")
@click.option("--rejudge", default=None, type=click.Path(), help="Judge a saved comparison again (no sides run).")
@click.option("--html", "html_path", default=None, type=click.Path(), help="Write a self-contained HTML report.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON (schema parity.compare/1).")
@click.option(
    "--generate",
    "generate_steps",
    default=None,
    type=click.IntRange(1),
    help="Decode N greedy steps on "
    "both sides and compare tokens, step margins, KL and KV caches (parity.compare.generation).",
)
@click.option(
    "--tokenizer", default=None, type=click.Path(), help="With --generate: SentencePiece model to show the text."
)
@click.option("--stop-at-eos", is_flag=True, help="With --generate: stop rows at <eos> (default: ignore it).")
def compare_cmd(
    ckpt,
    side_a,
    side_b,
    against,
    impl,
    inputs,
    convention,
    config,
    layer_by_layer,
    teacher_forced,
    points,
    profile,
    policy,
    allow_convention_mismatch,
    save,
    rejudge,
    html_path,
    as_json,
    generate_steps,
    tokenizer,
    stop_at_eos,
):
    """Compare two runs point by point: exit 0 when every point passes, 1 on a mismatch, 2 on bad input."""
    from parity import compare as cmp
    from parity.compare.html import write_html
    from parity.compare.report import render

    if generate_steps is not None:
        _compare_generation(
            ckpt,
            side_a,
            side_b,
            against,
            impl,
            inputs,
            convention,
            config,
            teacher_forced,
            profile,
            policy,
            allow_convention_mismatch,
            html_path,
            as_json,
            generate_steps,
            tokenizer,
            stop_at_eos,
            layer_by_layer or points or save or rejudge,
        )
    if rejudge:
        c = cmp.rejudge(rejudge, profile=profile, policy=policy)
    else:
        with _status(not as_json and sys.stderr.isatty()) as say:
            c = cmp.compare(
                side_a,
                side_b,
                ckpt=ckpt,
                against=against,
                inputs=inputs,
                impl=impl,
                convention=convention,
                config=config,
                layer_by_layer=layer_by_layer,
                teacher_forced=teacher_forced,
                points=points,
                profile=profile,
                policy=policy,
                allow_convention_mismatch=allow_convention_mismatch,
                progress=say,
            )
    if save:
        cmp.save(c, save)
    if html_path:
        write_html(c, html_path)
    _emit(c.to_dict(), as_json, lambda _: render(c))
    sys.exit(c.exit_code)


def _compare_generation(
    ckpt,
    side_a,
    side_b,
    against,
    impl,
    inputs,
    convention,
    config,
    teacher_forced,
    profile,
    policy,
    allow_convention_mismatch,
    html_path,
    as_json,
    steps,
    tokenizer,
    stop_at_eos,
    contradicting,
):
    from parity.compare import generation
    from parity.errors import UsageError

    if contradicting:
        raise UsageError("--generate compares decoding; it takes none of --layer-by-layer, --points, --save, --rejudge")
    with _status(not as_json and sys.stderr.isatty()) as say:
        c = generation.compare_generation(
            side_a,
            side_b,
            ckpt=ckpt,
            against=against,
            inputs=inputs,
            steps=steps,
            impl=impl,
            convention=convention,
            config=config,
            teacher_forced=teacher_forced,
            ignore_eos=not stop_at_eos,
            profile=profile,
            policy=policy,
            tokenizer=tokenizer,
            allow_convention_mismatch=allow_convention_mismatch,
            progress=say,
        )
    if html_path:
        generation.write_html(c, html_path)
    _emit(c.to_dict(), as_json, lambda _: generation.render(c))
    sys.exit(c.exit_code)


# -- parity golden (issue 8): record / check golden bundles (parity.golden) -------------------------------------
@main.group("golden")
def golden_group():
    """Golden bundles: record a run as the expectation, check an implementation against it."""


@golden_group.command("record")
@click.argument("ckpt", type=click.Path())
@click.option("--inputs", required=True, type=click.Path(), help="Inputs file (copied into the bundle).")
@click.option(
    "--impl",
    default="torch",
    type=click.Choice(["torch", "jax", "transformers"]),
    show_default=True,
    help="Implementation that records the expectation.",
)
@click.option(
    "--convention",
    default=None,
    type=click.Choice(["big_vision", "transformers"]),
    help="Conventions preset (default: transformers for --impl transformers, else big_vision).",
)
@click.option(
    "--generate",
    "steps",
    default=None,
    type=click.IntRange(1),
    help="Also record N greedy tokens (ignore_eos) with their step logits and the KV cache.",
)
@click.option("--dtype", default="float32", type=click.Choice(["float32", "bfloat16", "float16"]), show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--precision", default="highest", type=click.Choice(["highest", "high", "default"]), show_default=True)
@click.option("--config", default=None, help="Variant name or config.json (default: detected).")
@click.option("-o", "--output", required=True, type=click.Path(), help="The bundle directory (NAME.bundle).")
@click.option("--update", is_flag=True, help="Re-record into an existing bundle and report what changed.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def golden_record_cmd(ckpt, inputs, impl, convention, steps, dtype, device, precision, config, output, update, as_json):
    """Record the expectation of this device class and precision profile into a golden bundle."""
    from parity import golden

    with _status(not as_json and sys.stderr.isatty()) as say:
        rep = golden.record(
            ckpt,
            inputs,
            output,
            impl=impl,
            convention=convention,
            steps=steps,
            dtype=dtype,
            device=device,
            precision=precision,
            config=config,
            update=update,
            progress=say,
        )
    _emit(rep, as_json, lambda _: golden.render_record(rep))


@golden_group.command("check")
@click.argument("bundle", type=click.Path())
@click.option("--impl", default="torch", type=click.Choice(["torch", "jax"]), show_default=True)
@click.option(
    "--checkpoint",
    default=None,
    type=click.Path(),
    help="Check this checkpoint instead of the bundle's (then not sha256-verified).",
)
@click.option(
    "--profile",
    default=None,
    type=click.Choice(["fp32", "tf32", "f16", "bf16"]),
    help="Tolerance profile (default: chosen from the two manifests).",
)
@click.option("--policy", default=None, type=click.Path(), help="Policy file (TOML or JSON): per-point rules.")
@click.option("--dtype", default="float32", type=click.Choice(["float32", "bfloat16", "float16"]), show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--precision", default="highest", type=click.Choice(["highest", "high", "default"]), show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (schema parity.golden.check/1).")
def golden_check_cmd(bundle, impl, checkpoint, profile, policy, dtype, device, precision, as_json):
    """Run an implementation on a bundle's inputs and compare: exit 0 when it matches, 1 if not, 2 bad input."""
    from parity import golden

    with _status(not as_json and sys.stderr.isatty()) as say:
        r = golden.check(
            bundle,
            impl=impl,
            checkpoint=checkpoint,
            profile=profile,
            policy=policy,
            dtype=dtype,
            device=device,
            precision=precision,
            progress=say,
        )
    _emit(r.to_dict(), as_json, lambda _: golden.render(r))
    sys.exit(r.exit_code)


@contextlib.contextmanager
def _status(enabled: bool):
    """A rich status line on stderr naming what runs now, or nothing."""
    if not enabled:
        yield None
        return
    from rich.console import Console

    with Console(stderr=True).status("starting") as st:
        yield lambda msg: st.update(f"running {msg}")


main.add_command(assets)

if __name__ == "__main__":
    main()
