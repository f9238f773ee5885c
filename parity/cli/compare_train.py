"""`parity compare --train-step`: the CLI's part (options checked, the comparison run or rejudged, the report),
thin over parity.compare.train_step; `parity compare` (cli/compare.py) hands over to it."""

from __future__ import annotations

import sys

from parity.cli.base import _emit, _status


def _train_options(train_step, trainable, steps, lr, frozen_dtype, vit_matmul_dtype, generate_steps, truth):
    """The TrainOptions of `--train-step` (None without it); its options without it, or beside --generate /
    --truth, are a UsageError."""
    from parity.errors import UsageError
    from parity.training import TrainOptions

    given = {
        "--trainable": trainable or None,
        "--steps": steps,
        "--lr": lr,
        "--frozen-dtype": frozen_dtype,
        "--vit-matmul-dtype": vit_matmul_dtype,
    }
    if not train_step:
        named = [k for k, v in given.items() if v is not None]
        if named:
            raise UsageError(f"{', '.join(named)}: options of --train-step (give --train-step, or leave them out)")
        return None
    if generate_steps is not None or truth:
        raise UsageError("--train-step compares a training step; it takes neither --generate nor --truth")
    fields = dict(trainable=tuple(trainable), steps=steps, lr=lr, frozen_dtype=frozen_dtype)
    fields["vit_matmul_dtype"] = vit_matmul_dtype
    return TrainOptions(**{k: v for k, v in fields.items() if v not in (None, ())})


def _saved_train_step(path) -> bool:
    from parity.compare.train_step import is_train_step

    return is_train_step(path)


def _compare_train(options, run: dict, save, rejudge, html_path, as_json):
    """Run (or --rejudge) a training-step comparison and report it; exits 0 / 1."""
    from parity import compare as cmp
    from parity.compare import train_step
    from parity.compare.html import write_html
    from parity.compare.report import render

    if rejudge:
        c = train_step.rejudge(rejudge, profile=run["profile"], policy=run["policy"])
    else:
        with _status(not as_json and sys.stderr.isatty()) as say:
            allow = run.pop("allow")
            c = train_step.compare_train_step(**run, options=options, allow_convention_mismatch=allow, progress=say)
    if save:
        cmp.save(c, save)
    if html_path:
        write_html(c, html_path)
    _emit(c.to_dict(), as_json, lambda _: render(c))
    sys.exit(c.exit_code)


def _golden_record_train(ckpt, inputs, output, steps, update, as_json, run: dict):
    """`golden record --train-step`: a training-step bundle (parity.golden_train)."""
    from parity import golden_train
    from parity.errors import UsageError

    if steps is not None:
        raise UsageError("--generate records decoding; a --train-step bundle records one training step")
    with _status(not as_json and sys.stderr.isatty()) as say:
        rep = golden_train.record(ckpt, inputs, output, update=update, progress=say, **run)
    _emit(rep, as_json, lambda _: print(f"recorded {output}: one training step of {rep['impl']} ({rep['convention']})"))
    sys.exit(0)


def _golden_check_train(bundle, run: dict, as_json):
    """`golden check` of a training-step bundle: compared as `compare --train-step` judges; returns for others."""
    from parity import golden_train
    from parity.compare.report import render

    if not golden_train.is_train_bundle(bundle):
        return
    with _status(not as_json and sys.stderr.isatty()) as say:
        r = golden_train.check(bundle, progress=say, **run)

    def human(_):
        render(r.comparison)
        for leaf, v in r.zero_leaves.items():
            verdict = "pass" if v < golden_train.NEAR_ZERO else "FAIL"
            print(f"exactly-zero gradient {leaf}: {v:.2g} of the largest leaf norm ({verdict})")

    _emit(r.to_dict(), as_json, human)
    sys.exit(r.exit_code)
