"""Block-streamed runs (issue 24 §1): a model run one unit at a time, holding only the current unit's weights.

The units, in forward order: the patch embedding (+ position embedding), each ViT block, the encoder norm, the
projector, the input embedding (only the rows of the tokens present), each Gemma block, the final norm and the
tied head (applied in row chunks of the embedding table, so the table is never resident). Each unit's weights are
read from the checkpoint by byte range (`converters.checkpoint.Checkpoint.canonical` / `canonical_block`: npz,
safetensors, orbax; bf16/f16/f32 on disk), rounded to `--dtype` when the compute dtype differs (as the resident
load does) and cast to the compute dtype by the implementation when placed. A reader thread reads the next unit
while the current one computes, so at most two units are held.

This module is written once for every implementation over a small per-implementation hook (`torch_impl/stream.py`,
`jax_impl/stream.py`, mirrored): `skeleton` (a model with no weights), `patch`, `vit_block`, `llm_block` and `unit`,
each given the unit's weights as {canonical key: numpy array} (a layer's slice for stacked keys). `Streamed` wraps
a backend and its hook into a `parity.backend.UnitBackend`, so capture, compare (propagated and teacher-forced) and
golden check run through `pipeline.record_run` unchanged.

The checkpoint's identity (size, mtime and inode of every file) is taken when it is opened and checked before and
after every read: a file that changes on disk during the run is refused (CheckpointError, exit 2), never mixed.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from converters import dtypes
from parity import monitor
from parity import points as pts
from parity.blockcheck import check_block, check_unit
from parity.config import PaliGemmaConfig
from parity.errors import CheckpointError, UsageError
from parity.inputs import validate_inputs

VIT = "img/Transformer/encoderblock/"
LLM = "llm/layers/"
PATCH = ("img/embedding/kernel", "img/embedding/bias", "img/pos_embedding")
UNIT_KEYS = {
    pts.IMG_FINAL_NORM: ("img/Transformer/encoder_norm/scale", "img/Transformer/encoder_norm/bias"),
    pts.PROJECTOR: ("img/head/kernel", "img/head/bias"),
    pts.LLM_FINAL_NORM: ("llm/final_norm/scale",),
}
EMBED = "llm/embedder/input_embedding"
HEAD_ALIGN = 64  # head chunks hold a multiple of 64 rows (head_rows)
HOOKS = {"torch": "parity.torch_impl.stream", "jax": "parity.jax_impl.stream"}


def hook(impl: str):
    """The streaming hook module of implementation `impl`, or UsageError when it has none."""
    if impl not in HOOKS:
        raise UsageError(
            f"--stream: implementation {impl!r} does not run block-streamed (streamed: {', '.join(HOOKS)})"
        )
    return importlib.import_module(HOOKS[impl])


# -- the checkpoint, read unit by unit ----------------------------------------------------------------------------
def identity(path: str) -> tuple:
    """(name, size, mtime_ns, inode) of a file, or of every file under a directory (sorted)."""
    files = [path]
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names)
    out = []
    for f in files:
        st = os.stat(f)
        out.append((os.path.relpath(f, path), st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


class Source:
    """The units' weights of an open Checkpoint (`ck`), each rounded to `rounding` (None: kept as stored), as the
    resident load rounds them, then cast to `compute` (on the reader thread, off the compute's)."""

    def __init__(self, ck, rounding: np.dtype | None, compute: np.dtype | None = None):
        self.ck, self.rounding, self.compute = ck, rounding, compute
        self.entries = {e.key: e for e in ck.entries()}
        self.identity = identity(ck.path)
        self.bytes_read = 0

    def check(self) -> None:
        """CheckpointError (one line) when the checkpoint's files changed since it was opened."""
        try:
            now = identity(self.ck.path)
        except OSError as e:
            now = (str(e),)
        if now != self.identity:
            raise CheckpointError(
                f"{self.ck.path}: changed on disk during a streamed run (size, mtime or inode differs from when it "
                f"was opened); refused rather than mixing two versions: rerun when the file is stable"
            )

    def _cast(self, x: np.ndarray) -> np.ndarray:
        self.bytes_read += x.nbytes
        x = dtypes.cast(np.ascontiguousarray(x), self.rounding)
        if self.compute is None or x.dtype == self.compute:
            return x  # no copy here (torch aliases it as it is; jax's hook copies an unaligned one, a tensor at a time)
        return aligned(x, self.compute)

    def read(self, keys, layer: int | None = None) -> dict[str, np.ndarray]:
        """{key: tensor} of `keys` (their layer `layer` for stacked keys)."""
        self.check()
        out = {}
        for k in keys:
            e = self.entries[k]
            out[k] = self._cast(self.ck.canonical(e, () if layer is None else (layer,)))
        self.check()
        return out

    def layer(self, prefix: str, i: int) -> dict[str, np.ndarray]:
        """Every stacked key under `prefix` (a ViT or Gemma block), its layer i."""
        return self.read([k for k in self.entries if k.startswith(prefix)], i)

    def rows(self, a: int, b: int) -> dict[str, np.ndarray]:
        """Rows [a, b) of the embedding table."""
        self.check()
        out = {EMBED: self._cast(self.ck.canonical_block(self.entries[EMBED], (), (a, b)))}
        self.check()
        return out

    def take(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """The embedding rows `ids` (sorted, unique), read as runs of consecutive rows."""
        self.check()
        e, parts = self.entries[EMBED], []
        if len(ids):
            breaks = np.flatnonzero(np.diff(ids) != 1) + 1
            for run in np.split(ids, breaks):
                parts.append(self.ck.canonical_block(e, (), (int(run[0]), int(run[-1]) + 1)))
        table = np.concatenate(parts) if parts else np.zeros((0,) + e.shape[1:], self.ck.dtype(e))
        self.check()
        return {EMBED: self._cast(table)}


ALIGN = 64  # bytes: the alignment at which jax's CPU client aliases a host buffer instead of copying it


def aligned(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """x cast to `dtype` (round to nearest even) in an array at an ALIGN-byte-aligned address; x itself when it is
    one already. numpy's large arrays sit 16 bytes into their pages, so jax's device_put copies them (asynchronously:
    the array and its copy were both held while a unit was placed); an aligned one it aliases, as torch aliases any
    numpy array. The reader casts straight into an aligned buffer, the one copy a cast makes anyway."""
    dtype = np.dtype(dtype)
    if x.dtype == dtype and x.ctypes.data % ALIGN == 0 and x.flags.c_contiguous:
        return x
    raw = np.empty(x.size * dtype.itemsize + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    out = raw[start : start + x.size * dtype.itemsize].view(dtype).reshape(x.shape)
    np.copyto(out, x, casting="unsafe")
    return out


def pipelined(steps: list[tuple[Callable[[], dict], Callable[[dict], None], str | None]]) -> None:
    """Run `steps` (read, run, tick) in order, each run given its read's weights; a reader thread reads the next
    step's weights while this one runs, so at most two units are held. After each run: monitor.tick(tick) when
    given (progress), else monitor.check() (cancellation)."""
    with ThreadPoolExecutor(1, thread_name_prefix="parity-stream") as pool:
        nxt = pool.submit(steps[0][0]) if steps else None
        for k, (_, run, tick) in enumerate(steps):
            w = nxt.result()
            if k + 1 < len(steps):
                nxt = pool.submit(steps[k + 1][0])
            run(w)
            del w
            if tick:
                monitor.tick(tick)
            else:
                monitor.check()


# -- the model a streamed run holds -------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class StreamModel:
    """A hook's weightless model, the checkpoint it reads, and how many embedding rows a head chunk holds."""

    hook: Any
    model: Any
    source: Source
    config: PaliGemmaConfig
    chunk_rows: int

    def spans(self) -> list[tuple[int, int]]:
        """The head's chunks: [a, b) row ranges of the embedding table, `chunk_rows` each."""
        v, n = self.config.text.vocab_size, self.chunk_rows
        return [(a, min(a + n, v)) for a in range(0, v, n)]

    def close(self) -> None:
        self.source.ck.close()


def head_rows(config: PaliGemmaConfig) -> int:
    """Rows of the embedding table one head chunk holds: about as many parameters as the largest other unit, a
    multiple of HEAD_ALIGN rows. With a chunk of any other size the CPU's matmul (MKL's sgemm, XLA's dot) may sum a
    logit's D axis in another order than over the whole table (measured: 1-ulp differences for a few rows)."""
    from parity import estimate

    return max(HEAD_ALIGN, estimate.largest_unit(config) // config.text.width // HEAD_ALIGN * HEAD_ALIGN)


def load(ck, impl: str, conventions, compute: str, rounding, device: str, precision: str) -> StreamModel:
    """A StreamModel over the open Checkpoint `ck` (kept open: StreamModel.close closes it)."""
    h = hook(impl)
    skeleton = h.skeleton(ck.config, conventions, compute, device, precision)
    wide = dtypes.FLOAT_DTYPES.get(compute, np.dtype(np.float64) if compute == "float64" else None)
    return StreamModel(h, skeleton, Source(ck, rounding, wide), ck.config, head_rows(ck.config))


# -- the backend ---------------------------------------------------------------------------------------------------
class Streamed:
    """A UnitBackend running `backend`'s implementation block-streamed through its hook (the model: a
    StreamModel). Everything but running is the wrapped backend's."""

    def __init__(self, backend):
        self.backend = backend
        self.name = backend.name
        self.build_options = backend.build_options

    def resolve_device(self, device: str) -> str:
        return self.backend.resolve_device(device)

    def device_description(self, device: str) -> str:
        return self.backend.device_description(device)

    def speed_warning(self, dtype: str, device: str) -> str | None:
        return self.backend.speed_warning(dtype, device)

    def build_model(self, *args, **kwargs):
        raise UsageError("a streamed run builds no whole model (parity.stream.load)")

    def manifest(self, m: StreamModel) -> dict[str, Any]:
        return {**m.hook.manifest(m.model), "execution": "streamed"}

    def notes(self, m: StreamModel) -> dict[str, Any]:
        return {}

    def generate(self, m: StreamModel, *args, **kwargs) -> dict[str, Any]:
        """Prefill streamed, then each decode step streams the weights again (parity.stream_generate)."""
        from parity import stream_generate

        return stream_generate.generate(self, m, *args, **kwargs)

    # -- one unit each (teacher-forced compares call these on the reference's inputs) ------------------------------
    def vit_block(self, m: StreamModel, i: int, x: np.ndarray) -> dict[str, np.ndarray]:
        check_block(i, m.config.vision.depth, x, m.config.vision.width, "ViT")
        return m.hook.vit_block(m.model, m.source.layer(VIT, i), i, x)

    def llm_block(self, m: StreamModel, i: int, x: np.ndarray, inputs) -> dict[str, np.ndarray]:
        check_block(i, m.config.text.depth, x, m.config.text.width, "LLM")
        inputs = validate_inputs(inputs, m.config, "inputs")
        return m.hook.llm_block(m.model, m.source.layer(LLM, i), i, x, inputs)

    def unit(self, m: StreamModel, point: str, x: np.ndarray, inputs) -> np.ndarray:
        check_unit(point, m.config, x)
        text = np.asarray(validate_inputs(inputs, m.config, "inputs")["text"])
        if point == pts.LLM_INPUT:
            ids, local = np.unique(text, return_inverse=True)
            return m.hook.unit(m.model, m.source.take(ids), point, x, local.reshape(text.shape))
        if point == pts.LOGITS:
            return self._head(m, x, text)
        return m.hook.unit(m.model, m.source.read(UNIT_KEYS.get(point, ())), point, x, text)

    def _head(self, m: StreamModel, x: np.ndarray, text) -> np.ndarray:
        """The tied head in row chunks of the embedding table (the next chunk read while this one computes)."""
        chunks: list[np.ndarray] = []
        run = lambda w: chunks.append(m.hook.unit(m.model, w, pts.LOGITS, x, text))
        pipelined([(lambda a=a, b=b: m.source.rows(a, b), run, None) for a, b in m.spans()])
        return np.concatenate(chunks, axis=-1)

    # -- a whole forward pass, unit by unit ------------------------------------------------------------------------
    def forward(self, m: StreamModel, inputs, points: list[str] | None = None) -> dict[str, np.ndarray]:
        """Capture `points` (None: logits) as the resident forward does, one unit at a time; units after the last
        point asked for are not run."""
        wanted = [pts.LOGITS] if points is None else list(points)
        order = pts.forward_points(m.config)
        unknown = sorted(set(wanted) - set(order))
        if unknown:
            raise ValueError(f"capture points not produced by a forward pass: {unknown}")
        inputs = validate_inputs(inputs, m.config, "inputs")
        last = max(order.index(p) for p in wanted)
        text = np.asarray(inputs["text"])
        ids, local = np.unique(text, return_inverse=True)
        local = local.reshape(text.shape)
        h, src, cfg = m.hook, m.source, m.config
        out: dict[str, np.ndarray] = {}
        state: dict[str, np.ndarray] = {}

        def keep(d: dict[str, np.ndarray], x: str) -> None:
            out.update({k: v for k, v in d.items() if k in wanted})
            state["x"] = d[x]

        steps: list[tuple[str, Callable[[], dict], Callable[[dict], None]]] = [
            (
                pts.IMG_PATCH_EMBED,
                lambda: src.read(PATCH),
                lambda w: keep(h.patch(m.model, w, inputs["image"]), pts.IMG_POS_EMBED),
            )
        ]
        for i in range(cfg.vision.depth):
            steps.append(
                (
                    pts.img_block_out(i),
                    lambda i=i: src.layer(VIT, i),
                    lambda w, i=i: keep(h.vit_block(m.model, w, i, state["x"]), pts.img_block_out(i)),
                )
            )
        for p in (pts.IMG_FINAL_NORM, pts.PROJECTOR):
            steps.append(
                (
                    p,
                    lambda p=p: src.read(UNIT_KEYS[p]),
                    lambda w, p=p: keep({p: h.unit(m.model, w, p, state["x"], text)}, p),
                )
            )
        steps.append(
            (
                pts.LLM_INPUT,
                lambda: src.take(ids),
                lambda w: keep({pts.LLM_INPUT: h.unit(m.model, w, pts.LLM_INPUT, state["x"], local)}, pts.LLM_INPUT),
            )
        )
        for i in range(cfg.text.depth):
            steps.append(
                (
                    pts.llm_block_out(i),
                    lambda i=i: src.layer(LLM, i),
                    lambda w, i=i: keep(h.llm_block(m.model, w, i, state["x"], inputs), pts.llm_block_out(i)),
                )
            )
        p = pts.LLM_FINAL_NORM
        steps.append(
            (p, lambda: src.read(UNIT_KEYS[p]), lambda w: keep({p: h.unit(m.model, w, p, state["x"], text)}, p))
        )
        blocks = lambda name: "block" if "/block" in name or "/layer" in name else None
        pipelined([(read, run, blocks(name)) for name, read, run in steps if order.index(name) <= last])
        if pts.LOGITS in wanted:
            out[pts.LOGITS] = self._head(m, state["x"], text)
            # Every tensor has been read front to back (a stacked key layer by layer, the table chunk by chunk), so
            # its stored checksum (npz CRC-32, ours in orbax) was verified on the way; this finishes whatever was not.
            m.source.ck.verify_read()
        src.check()
        return {k: out[k] for k in wanted}


def open_streamed(
    backend, path: str, cfg: PaliGemmaConfig, job, conventions, compute: str, rounding, device, warn, note
):
    """(Streamed backend, StreamModel) of a job that runs block-streamed; `note` (an automatic choice) to `warn`."""
    from converters.checkpoint import open_checkpoint

    if job.mesh:
        raise UsageError("--stream runs on one device: drop --mesh (or run resident)")
    if note and warn is not None:
        warn(note)
    ck = open_checkpoint(path, cfg)
    try:
        return Streamed(backend), load(ck, job.impl, conventions, compute, rounding, device, job.precision)
    except BaseException:
        ck.close()
        raise


def close(model) -> None:
    """Close a StreamModel's checkpoint (anything else: nothing to do)."""
    if isinstance(model, StreamModel):
        model.close()
