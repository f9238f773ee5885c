"""A fine-tuning step run through the pipeline: `record_train(job)` = `train(job)` (options and inputs checked before
any tensor is read, then the backend's `train_step`) + `write_train` (the first step's gradients to `job.grads`, the
updated checkpoint to `job.updated`, each whole or not at all: parity.train_output). The CLI runs `train` in
parity.run.interruptible's worker and `write_train` in the main thread, so that Ctrl-C during a write removes its
temporaries."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from parity import backend as backends
from parity import monitor, stream, stream_train
from parity.config import PaliGemmaConfig
from parity.errors import ConfigError, Diverged, InputsError, UsageError
from parity.inputs import load_inputs
from parity.job import Job
from parity.pipeline import Loaded, Progress, load
from parity.stream import StreamModel
from parity.training import TrainResult, trainable_leaves


# -- a training step ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainRecord:
    """What `record_train` did: the run's manifest, the step's result, the files it wrote."""

    loaded: Loaded
    result: TrainResult
    trainable: list[str]
    seconds: float
    written: dict[str, Any] = dataclasses.field(default_factory=dict)  # "grads": path, "updated": convert's report
    streamed: bool = False  # block-streamed (parity.stream_train)


def record_train(
    job: Job,
    progress: Progress | None = None,
    warn: Callable[[str], None] | None = None,
    overwrite: bool = False,
) -> TrainRecord:
    """Run `job.train` (parity.training.TrainOptions) with the job's backend on its inputs, which must hold
    mask_loss (`train`); then write the first step's gradients to `job.grads` and the updated checkpoint to
    `job.updated` (`write_train`). The CLI runs `train` in parity.run.interruptible's worker and `write_train` in
    the main thread, so that Ctrl-C during a write removes its temporaries."""
    rec = train(job, progress, warn, overwrite)
    write_train(job, rec, overwrite, progress)
    return rec


def train(
    job: Job,
    progress: Progress | None = None,
    warn: Callable[[str], None] | None = None,
    overwrite: bool = False,
) -> TrainRecord:
    """The training step of `job`, nothing written. Options, outputs (existing ones refused unless `overwrite`),
    the backend's training support, mask_loss and the --trainable globs are checked before any tensor is read; a
    NaN/Inf loss or gradient is Diverged (exit 1) naming the first step and leaf."""
    from parity import spec, train_output

    options = job.train
    if options is None:
        raise UsageError("record_train: the job has no training options")
    options.check()
    if job.stream:
        stream_train.check(options)  # float32 only, refused in one line before anything is read
    elif options.frozen_dtype != "float32" or options.vit_matmul_dtype != "float32":
        job = dataclasses.replace(job, stream=False)  # never chosen automatically for a mode it does not run
    be = backends.get(job.impl)
    if not callable(getattr(be, "train_step", None)):
        raise ConfigError(f"--impl {job.impl}: this implementation has no training step (train_step)")
    if job.updated:
        train_output.output_format(job.updated, job.updated_format)  # a format it can write, before any work
    for path in (job.grads, job.updated):
        if path is not None and os.path.lexists(path) and not overwrite:
            raise UsageError(f"{path}: output exists; pass --overwrite to replace it")
    if "mask_loss" not in load_inputs(job.inputs, validate=False):
        raise InputsError(
            f"{job.inputs}: no 'mask_loss' (the tokens to learn): not a training batch; make one with "
            "`parity inputs --suffix` (or `parity inputs --jsonl`)"
        )
    leaves: list[str] = []

    def check(cfg: PaliGemmaConfig) -> None:
        leaves[:] = trainable_leaves(options, [e.key for e in spec.entries(cfg)])

    loaded = load(job, progress, warn, check)
    done = [0]

    def report(unit: str) -> None:
        if unit == "step" and progress:
            done[0] += 1
            progress("training", done[0], options.steps)

    if progress:
        progress("training", 0, options.steps)
    t0 = time.perf_counter()
    try:
        with monitor.reporting(report if progress else None):
            if isinstance(loaded.model, StreamModel):  # block-streamed (parity.stream_train)
                result = stream_train.train_step(loaded.model, loaded.inputs, options)
            else:
                result = be.train_step(loaded.model, loaded.inputs, options)
    finally:
        stream.close(loaded.model)
    streamed = isinstance(loaded.model, StreamModel)
    rec = TrainRecord(loaded, result, leaves, round(time.perf_counter() - t0, 3), streamed=streamed)
    if (bad := result.first_nonfinite()) is not None or (bad := _nonfinite_grads(result)) is not None:
        raise Diverged(f"training diverged: {bad} is not finite (NaN/Inf); nothing was written")
    return rec


def write_train(job: Job, rec: TrainRecord, overwrite: bool = False, progress: Progress | None = None) -> None:
    """The job's --grads and -o files from a finished step, each whole or not at all (train_output.write_outputs);
    their paths and convert's report go to `rec.written`."""
    from parity import train_output

    if job.grads is None and job.updated is None:
        return
    if progress:
        progress("writing", None, None)
    fmt = train_output.output_format(job.updated, job.updated_format) if job.updated else None
    updated = (job.checkpoint, job.config_arg, rec.result.params, job.updated, fmt) if job.updated else None
    rec.written = train_output.write_outputs(job.grads, rec.result.grads, updated, overwrite)


def _nonfinite_grads(result: TrainResult) -> str | None:
    """The first trainable leaf whose first-step gradient holds a NaN/Inf (its norm may overflow to inf alone)."""
    for key, g in result.grads.items():
        if not np.isfinite(g).all():
            return f"step 1: gradient of {key}"
    return None
