"""What `parity train-step` writes: the first step's gradients (`--grads`, an npz) and the updated checkpoint
(`-o`, any format), each whole under a temporary name and renamed into place, or not at all.

The gradients file holds one float32 array per trainable leaf under its canonical key (`llm/layers/attn/q_einsum/w`,
no `params/` prefix) in the canonical layout, and nothing else; `np.load` reads it.

The updated checkpoint goes through `converters.convert` itself: an `UpdatedCheckpoint` is the source checkpoint
with the trained leaves in place of the file's, so every format `parity convert` writes can be asked for, streamed
the same way. Frozen leaves are copied in their stored dtype, bit for bit; the trained leaves are written in
float32, the dtype they were trained in (an SGD update is often smaller than a bfloat16 step of the weight, so
rounding back to a bfloat16 file would erase it); `parity convert --dtype` rounds the whole file if wanted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import numpy as np

from converters.atomic import atomic_output
from converters.checkpoint import Checkpoint, open_checkpoint
from converters.npz_write import NpzWriter
from parity import spec
from parity.errors import UsageError

FORMATS = ("npz", "safetensors", "orbax")


def output_format(path: str, to: str | None) -> str:
    """--to, else the format the path's extension names (.npz); a directory format must be named."""
    if to is not None:
        if to not in FORMATS:
            raise UsageError(f"--to {to!r}: expected one of {', '.join(FORMATS)}")
        return to
    if str(path).endswith(".npz"):
        return "npz"
    raise UsageError(f"-o {path}: name the format with --to {{{','.join(FORMATS)}}} (only .npz is told by its name)")


@dataclasses.dataclass
class UpdatedCheckpoint(Checkpoint):
    """A Checkpoint whose leaves in `overrides` (canonical key -> float32 canonical array) read as those arrays."""

    overrides: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def dtype(self, e: spec.Entry) -> np.dtype:
        return np.dtype(np.float32) if e.key in self.overrides else super().dtype(e)

    def canonical(self, e: spec.Entry, index: tuple[int, ...] = ()) -> np.ndarray:
        if e.key in self.overrides:
            return np.ascontiguousarray(self.overrides[e.key][index])
        return super().canonical(e, index)

    def canonical_block(self, e: spec.Entry, index: tuple[int, ...], rows: tuple[int, int]) -> np.ndarray:
        if e.key in self.overrides:
            return np.ascontiguousarray(self.overrides[e.key][index][rows[0] : rows[1]])
        return super().canonical_block(e, index, rows)

    def _hf_piece(self, e: spec.Entry, index: tuple[int, ...], rows: tuple[int, int]) -> np.ndarray:
        if e.key in self.overrides:
            return self.canonical(e, index)[rows[0] : rows[1]]
        return super()._hf_piece(e, index, rows)


def write_updated(
    checkpoint: str, config, params: dict[str, np.ndarray], dst: str, to: str, overwrite: bool, progress=None
) -> dict:
    """The checkpoint at `checkpoint` with `params` (trained leaves) in place, written to `dst` in format `to` by
    converters.convert; returns convert's report."""
    from converters.convert import convert

    with open_checkpoint(checkpoint, config) as ck:
        fields = {f.name: getattr(ck, f.name) for f in dataclasses.fields(Checkpoint)}
        updated = UpdatedCheckpoint(**fields, overrides={k: np.asarray(v, np.float32) for k, v in params.items()})
        return convert(updated, dst, to, overwrite=overwrite, progress=progress)


def write_outputs(
    grads_path: str | None,
    grads: dict[str, np.ndarray],
    updated: tuple | None,
    overwrite: bool,
) -> dict:
    """The gradients npz (float32, canonical keys and layout) and the updated checkpoint (`updated`: (checkpoint,
    config, params, dst, format), or None), each written under a temporary name; the gradients file is renamed
    into place only after the checkpoint is complete, so an interruption or a failure anywhere leaves neither.
    Returns {"grads": path, "updated": convert's report} for what was written."""
    written: dict = {}
    with contextlib.ExitStack() as stack:
        if grads_path is not None:
            tmp = stack.enter_context(atomic_output(grads_path, False, overwrite))
            with open(tmp, "wb") as f, NpzWriter(f) as w:
                for key, g in grads.items():
                    g = np.ascontiguousarray(g, np.float32)
                    w.write(key, g.dtype, g.shape, [g.reshape(-1)])
            written["grads"] = os.path.abspath(grads_path)
        if updated is not None:
            checkpoint, config, params, dst, to = updated
            written["updated"] = write_updated(checkpoint, config, params, dst, to, overwrite)
    return written
