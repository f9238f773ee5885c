"""`parity train-step`: a fine-tuning step of one backend (parity.train_run.record_train)."""

from __future__ import annotations

import click

from parity.cli.base import _emit, _show_progress, main, stage_progress
from parity.cli.runs import _conventions_line, _model_options, _warnings
from parity.training import DEFAULT_TRAINABLE, FROZEN_DTYPES, VIT_MATMUL_DTYPES


@main.command("train-step")
@click.argument("ckpt", type=click.Path())
@_model_options
@click.option(
    "--trainable",
    "trainable",
    multiple=True,
    metavar="GLOB",
    help="Leaves to train: fnmatch globs over the canonical npz keys (repeatable; each must match a leaf); "
    f"'all' trains every leaf  [default: {', '.join(DEFAULT_TRAINABLE)}]",
)
@click.option("--steps", default=1, type=int, help="SGD steps, each on the same batch (>= 1).")
@click.option("--lr", default=0.03, type=float, help="Learning rate of plain SGD, w - lr * g (finite, >= 0).")
@click.option(
    "--frozen-dtype",
    default="float32",
    type=click.Choice(FROZEN_DTYPES),
    help="float16: frozen leaves rounded to float16, trained ones float32; the embedding product and RMSNorm's "
    "1 + scale formed in float16 (big_vision's guide; exact to float32 rounding).",
)
@click.option(
    "--vit-matmul-dtype",
    default="float32",
    type=click.Choice(VIT_MATMUL_DTYPES),
    help="float16: big_vision's img.dtype_mm: the ViT's Dense/Conv operands in float16, the rest in its leaves' "
    "dtypes (float16 frozen under --frozen-dtype float16, float32 trained).",
)
@click.option(
    "--grads",
    default=None,
    type=click.Path(),
    help="Write the first step's gradient of every trainable leaf (float32, canonical keys and layout) to this npz.",
)
@click.option(
    "-o",
    "--output",
    default=None,
    type=click.Path(),
    help="Write the updated checkpoint here (trained leaves float32, frozen ones bit-identical).",
)
@click.option(
    "--to",
    "to",
    default=None,
    type=click.Choice(["npz", "safetensors", "orbax"]),
    help="Format of -o  [default: npz for a .npz path; required otherwise]",
)
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
@click.option(
    "--stream",
    is_flag=True,
    default=None,
    help="Run block-streamed: one unit's weights at a time, read from CKPT, plus the trainable leaves and their "
    "gradients (float32 only; the same step). Chosen automatically, with a line saying so, when resident would not "
    "fit.",
)
@click.option("--json", "as_json", is_flag=True, help='Print a JSON report: {"steps": [{"step", "loss", ...}], ...}.')
def train_step(
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
    trainable,
    steps,
    lr,
    frozen_dtype,
    vit_matmul_dtype,
    grads,
    output,
    to,
    overwrite,
    stream,
    as_json,
):
    """Fine-tune CKPT on the training batch --inputs (made by `parity inputs --suffix`): loss, per-example losses,
    gradient and weight norms per step; optionally the first gradients (--grads) and the updated checkpoint (-o)."""
    from parity.job import Job
    from parity.run import interruptible
    from parity.train_run import train, write_train
    from parity.training import TrainOptions

    options = TrainOptions(
        trainable=tuple(trainable) or DEFAULT_TRAINABLE,
        steps=steps,
        lr=lr,
        frozen_dtype=frozen_dtype,
        vit_matmul_dtype=vit_matmul_dtype,
    )
    job = Job(
        checkpoint=ckpt,
        inputs=inputs,
        impl=impl,
        convention=convention,
        settings=settings,
        config=config,
        dtype=dtype,
        compute_dtype=compute_dtype,
        device=device,
        precision=precision,
        mesh=mesh,
        train=options,
        grads=grads,
        updated=output,
        updated_format=to,
        stream=stream or None,
    )
    warnings: list[str] = []
    warn = _warnings(warnings)
    with stage_progress(_show_progress()) as progress:
        rec = interruptible(train, job, progress=progress, warn=warn, overwrite=overwrite)
        write_train(job, rec, overwrite, progress)  # in this thread: Ctrl-C removes the temporaries
    result = rec.result
    if result.empty_rows:
        warn(f"rows {result.empty_rows} have no loss token after the shift: they contribute 0 to the loss")
    report = {
        "impl": impl,
        "convention": rec.loaded.manifest["conventions"],
        "options": options.to_dict(),
        "trainable": rec.trainable,
        "steps": [s.to_dict() for s in result.steps],
        "empty_rows": result.empty_rows,
        "grads": rec.written.get("grads"),
        "updated": rec.written.get("updated"),
        "train_seconds": rec.seconds,
        "execution": "streamed" if rec.streamed else "resident",
        "warnings": warnings,
        "manifest": rec.loaded.manifest,
    }

    def render(r):
        from rich.console import Console
        from rich.table import Table

        con = Console()
        con.print(
            f"{len(r['steps'])} SGD step(s), lr {lr}, {len(r['trainable'])} trainable leaves, {impl}"
            f"{', block-streamed' if r['execution'] == 'streamed' else ''} "
            f"({_conventions_line(convention, settings)}), {r['train_seconds']} s",
            highlight=False,
            soft_wrap=True,
        )
        t = Table("step", "loss", "per-example loss", "grad norm")
        for s in r["steps"]:
            ex = ", ".join(f"{x:.6g}" for x in s["example_loss"])
            t.add_row(str(s["step"]), f"{s['loss']:.7g}", ex, f"{s['grad_norm']:.5g}")
        con.print(t)
        shown = r["steps"][:1] + r["steps"][1:][-1:]  # the first and the last step
        for s in shown:
            t = Table("leaf", "grad norm", "weight norm", "grad/weight", title=f"step {s['step']}")
            for k, g in s["leaf_grad_norm"].items():
                ratio = s["leaf_grad_to_weight"][k]
                t.add_row(k, f"{g:.5g}", f"{s['leaf_weight_norm'][k]:.5g}", "-" if ratio is None else f"{ratio:.3g}")
            con.print(t)
        if r["grads"]:
            con.print(f"wrote {r['grads']} (first step's gradients)", highlight=False)
        if r["updated"]:
            con.print(f"wrote {r['updated']['destination']['path']} (updated checkpoint)", highlight=False)

    _emit(report, as_json, render)
