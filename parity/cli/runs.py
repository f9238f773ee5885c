"""`parity capture` and `parity generate`: one backend run (parity.run over parity.pipeline.record_run)."""

from __future__ import annotations

import click

from parity.backend import DTYPES, PRECISIONS
from parity.cli.base import BackendChoice, _emit, _show_progress, main, stage_progress
from parity.conventions import PRESETS


def _model_options(fn):
    """Options shared by the commands that run a model."""
    for opt in reversed(
        [
            click.option("--impl", default="torch", type=BackendChoice(), help="Implementation to run."),
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
                type=click.Choice(DTYPES),
                help="Parameter dtype (values rounded to it) and, unless --compute-dtype, compute dtype.",
            ),
            click.option(
                "--compute-dtype",
                default=None,
                type=click.Choice(DTYPES),
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
                type=click.Choice(PRECISIONS),
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
@click.option(
    "--stream",
    is_flag=True,
    default=None,
    help="Run block-streamed: one unit's weights at a time, read from CKPT (~1 GB + 2 x the largest block; "
    "same points). Chosen automatically, with a line saying so, when a resident run would not fit.",
)
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
    stream,
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
            stream=stream or None,
        )
    m["warnings"] = warnings

    def render(r):
        click.echo(
            f"captured {len(r['points'])} points with {r['impl']} ({r['dtype']}"
            f"{'' if r['compute_dtype'] == r['dtype'] else ', computed in ' + r['compute_dtype']}, "
            f"{r['device']}, {_conventions_line(convention, settings)}) -> {r['output']}"
        )
        streamed = ", block-streamed" if r.get("execution") == "streamed" else ""
        click.echo(f"  load {r['load_seconds']} s, forward {r['run_seconds']} s{streamed}, total {r['seconds']} s")

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
@click.option(
    "--stream",
    is_flag=True,
    default=None,
    help="Run block-streamed: the prompt one unit's weights at a time (as capture --stream), the KV cache held. "
    "Cost per token: every decode step reads every Gemma block and the whole embedding table from CKPT again, "
    "about the checkpoint's size per token (PaliGemma 2 3B bf16: ~5.2 GB per token, at disk or page-cache "
    "speed); same tokens as resident. Chosen automatically, with a line saying so, when a resident run would not "
    "fit.",
)
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
    stream,
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
            stream=stream or None,
        )
    r["manifest"]["warnings"] = warnings

    def render(r):
        for row in r["rows"]:
            click.echo(f"row {row['row']}: {row['tokens']}" + (f"  {row['text']!r}" if "text" in row else ""))
        m = r["manifest"]
        streamed = ", block-streamed" if m.get("execution") == "streamed" else ""
        click.echo(
            f"({m['impl']}, {m['dtype']}, {m['device']}, {_conventions_line(convention, settings)}; "
            f"load {m['load_seconds']} s, generate {m['run_seconds']} s{streamed})"
        )
        if "output" in m:
            click.echo(f"wrote {m['output']}")

    _emit(r, as_json, render)
