"""`parity compare` and `parity golden record / check`: thin wrappers over parity.compare and parity.golden."""

from __future__ import annotations

import sys

import click

from parity.backend import DTYPES, PRECISIONS
from parity.cli.base import BackendChoice, _emit, _status, main
from parity.cli.compare_train import (
    _compare_train,
    _golden_check_train,
    _golden_record_train,
    _saved_train_step,
    _train_options,
)
from parity.conventions import PRESETS
from parity.training import FROZEN_DTYPES, VIT_MATMUL_DTYPES


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
    type=click.Choice(["fp64", "fp32", "tf32", "f16", "bf16"]),
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
@click.option(
    "--stream",
    is_flag=True,
    help="Run the implementation sides block-streamed (one unit's weights at a time; see parity capture "
    "--stream). With --generate every decode step reads the weights again (~the checkpoint's size per token; "
    "see parity generate --stream). Chosen per side automatically when a resident side would not fit.",
)
@click.option(
    "--truth",
    is_flag=True,
    help="Also run side A's implementation in float64 and say, per point and overall, which side drifts from it.",
)
@click.option(
    "--train-step",
    is_flag=True,
    help="Compare one fine-tuning step point by point: the training forward, the loss, the gradient at every "
    "unit input and of every trainable leaf (parity.compare.train_step); --inputs must hold mask_loss.",
)
@click.option(
    "--trainable",
    multiple=True,
    metavar="GLOB",
    help="With --train-step: leaves to train, as `parity train-step --trainable` (repeatable; default "
    "llm/layers/attn/*; 'all' trains every leaf).",
)
@click.option("--steps", default=None, type=int, help="With --train-step: SGD steps (>= 1; default 1).")
@click.option("--lr", default=None, type=float, help="With --train-step: learning rate of plain SGD (default 0.03).")
@click.option(
    "--frozen-dtype",
    default=None,
    type=click.Choice(FROZEN_DTYPES),
    help="With --train-step: the frozen leaves' dtype (as `parity train-step`; default float32).",
)
@click.option(
    "--vit-matmul-dtype",
    default=None,
    type=click.Choice(VIT_MATMUL_DTYPES),
    help="With --train-step: the ViT's activation dtype (as `parity train-step`; default float32).",
)
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
    stream,
    truth,
    train_step,
    trainable,
    steps,
    lr,
    frozen_dtype,
    vit_matmul_dtype,
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
            layer_by_layer or points or save or rejudge or truth,
            stream,
        )
    train = _train_options(train_step, trainable, steps, lr, frozen_dtype, vit_matmul_dtype, generate_steps, truth)
    if train is not None or (rejudge and _saved_train_step(rejudge)):
        sides = dict(a=side_a, b=side_b, ckpt=ckpt, against=against, impl=impl, inputs=inputs, convention=convention)
        run = dict(config=config, teacher_forced=teacher_forced, points=points, profile=profile, policy=policy)
        _compare_train(train, {**sides, **run, "allow": allow_convention_mismatch}, save, rejudge, html_path, as_json)
    if rejudge and truth:
        from parity.errors import UsageError

        raise UsageError("--truth runs a float64 side; --rejudge runs nothing (a saved --truth comparison keeps it)")
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
                truth=truth,
                stream=stream or None,
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
    stream=None,
):
    from parity.compare import generation
    from parity.errors import UsageError

    if contradicting:
        raise UsageError(
            "--generate compares decoding; it takes none of --layer-by-layer, --points, --save, --rejudge, --truth"
        )
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
            stream=stream or None,
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
    type=BackendChoice(),
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
@click.option("--dtype", default="float32", type=click.Choice(DTYPES), show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--precision", default="highest", type=click.Choice(PRECISIONS), show_default=True)
@click.option("--config", default=None, help="Variant name or config.json (default: detected).")
@click.option("-o", "--output", required=True, type=click.Path(), help="The bundle directory (NAME.bundle).")
@click.option("--update", is_flag=True, help="Re-record into an existing bundle and report what changed.")
@click.option(
    "--train-step",
    is_flag=True,
    help="Record a training-step bundle instead: loss, per-example losses, per-leaf gradient norms and the full LLM "
    "attention gradients of one step (every leaf trainable; --inputs with mask_loss; parity.golden_train).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def golden_record_cmd(
    ckpt, inputs, impl, convention, steps, dtype, device, precision, config, output, update, train_step, as_json
):
    """Record the expectation of this device class and precision profile into a golden bundle."""
    from parity import golden

    if train_step:
        run = dict(impl=impl, convention=convention, dtype=dtype, device=device, precision=precision, config=config)
        _golden_record_train(ckpt, inputs, output, steps, update, as_json, run)

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
@click.option("--impl", default="torch", type=BackendChoice(), show_default=True, help="Implementation to check.")
@click.option(
    "--checkpoint",
    default=None,
    type=click.Path(),
    help="Check this checkpoint instead of the bundle's (then not sha256-verified).",
)
@click.option(
    "--profile",
    default=None,
    type=click.Choice(["fp64", "fp32", "tf32", "f16", "bf16"]),
    help="Tolerance profile (default: chosen from the two manifests).",
)
@click.option("--policy", default=None, type=click.Path(), help="Policy file (TOML or JSON): per-point rules.")
@click.option("--dtype", default="float32", type=click.Choice(DTYPES), show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--precision", default="highest", type=click.Choice(PRECISIONS), show_default=True)
@click.option(
    "--stream",
    is_flag=True,
    help="Run block-streamed (see parity capture --stream; the bundle's decoding re-reads the weights every step, "
    "~the checkpoint's size per token). Chosen automatically when a resident run would not fit.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (schema parity.golden.check/1).")
def golden_check_cmd(bundle, impl, checkpoint, profile, policy, dtype, device, precision, stream, as_json):
    """Run an implementation on a bundle's inputs and compare: exit 0 when it matches, 1 if not, 2 bad input."""
    from parity import golden

    run = dict(impl=impl, checkpoint=checkpoint, profile=profile, policy=policy, dtype=dtype, device=device)
    _golden_check_train(bundle, {**run, "precision": precision}, as_json)  # returns unless a training bundle

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
            stream=stream or None,
        )
    _emit(r.to_dict(), as_json, lambda _: golden.render(r))
    sys.exit(r.exit_code)
