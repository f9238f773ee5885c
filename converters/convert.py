"""`convert`: any supported checkpoint to npz, safetensors or orbax, streamed block by block through the spec.

Every tensor moves as blocks of at most converters.blocks.BLOCK_BYTES (a reader thread a block ahead of the
writer), so peak memory is a few blocks whatever the model size. Outputs are written under a temporary name beside
the destination and renamed when complete, so a failure leaves nothing behind. npz/orbax -> safetensors adds the HF
vocabulary padding rows (the mean embedding row; see `parity.spec.pad_rows_for`); safetensors -> npz/orbax drops
them: the one lossy step, reported in `notes`.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from converters import dtypes, memory, safetensors_io
from converters.atomic import atomic_output
from converters.checkpoint import Checkpoint, open_checkpoint, sidecar_path
from converters.hf_config import to_hf_config
from converters.npz_write import NpzWriter
from converters.orbax_io import CUSTOM_KEY
from parity import spec
from parity.config import PaliGemmaConfig
from parity.errors import OutputError, UsageError, describe

Progress = Callable[[int, int, str], None]  # (bytes done, bytes total, current key)


def _target_dtype(ck: Checkpoint, e: spec.Entry, dtype: str) -> np.dtype:
    return ck.dtype(e) if dtype == "keep" else dtypes.FLOAT_DTYPES[dtype]


FORMATS = ("npz", "safetensors", "orbax")


def background(items: Iterator, depth: int = 2) -> Iterator:
    """Produce `items` in a worker thread, `depth` ahead of the consumer: reading and transforming the next block
    (preadv, tiled transposes, CRC: all release the GIL) overlaps writing this one. Exceptions reach the consumer.
    Shutdown cannot deadlock: the worker never blocks on a full queue without watching `stop`, and a consumer that
    stops early (an error, Ctrl-C, SIGTERM) sets `stop` and drains the queue before joining. Close the generator
    (contextlib.closing) so the worker has stopped reading before its files are closed."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    end = object()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as e:  # forwarded, re-raised in the consumer
            put((end, e))

    t = threading.Thread(target=work, name="parity-convert-reader", daemon=True)
    t.start()
    try:
        while True:
            item, err = q.get()
            if item is end:
                if err is not None:
                    raise err
                return
            yield item
    finally:
        stop.set()
        while t.is_alive():
            with contextlib.suppress(queue.Empty):
                while True:
                    q.get_nowait()
            t.join(0.05)


@dataclass
class _Meter:
    """Bytes streamed so far out of `total`, reported to `progress` chunk by chunk."""

    total: int
    progress: Progress | None
    done: int = 0

    def take(self, stream: Iterator[np.ndarray], nbytes: int, key: str) -> Iterator[np.ndarray]:
        """The next `nbytes` worth of chunks from `stream` (one tensor's)."""
        got = 0
        while got < nbytes:
            c = next(stream)
            got += c.nbytes
            self.done += c.nbytes
            if self.progress:
                self.progress(self.done, self.total, key)
            yield c


def write_npz(ck: Checkpoint, tmp: str, dtype: str, progress: Progress | None) -> tuple[int, int]:
    ents = ck.entries()
    dts = [_target_dtype(ck, e, dtype) for e in ents]
    sizes = [int(np.prod(e.shape)) * dt.itemsize for e, dt in zip(ents, dts)]
    stream = background(dtypes.cast(c, dt) for e, dt in zip(ents, dts) for c in ck.canonical_chunks(e))
    meter = _Meter(sum(sizes), progress)
    with contextlib.closing(stream), open(tmp, "wb") as f, NpzWriter(f) as w:
        for e, dt, n in zip(ents, dts, sizes):
            w.write(spec.NPZ_PREFIX + e.key, dt, e.shape, meter.take(stream, n, e.key))
    return len(ents), sum(sizes)


def write_orbax(ck: Checkpoint, tmpdir: str, dtype: str, progress: Progress | None) -> tuple[int, int]:
    """big_vision's tree (canonical keys split at `/`) as an OCDBT orbax checkpoint, array by array; the config
    goes into orbax's custom metadata."""
    from converters.orbax_io import OrbaxWriter  # tensorstore only when an orbax path is touched

    ents = ck.entries()
    dts = [_target_dtype(ck, e, dtype) for e in ents]
    sizes = [int(np.prod(e.shape)) * dt.itemsize for e, dt in zip(ents, dts)]
    stream = background(dtypes.cast(c, dt) for e, dt in zip(ents, dts) for c in ck.canonical_chunks(e))
    meter = _Meter(sum(sizes), progress)
    w = OrbaxWriter(tmpdir)
    for e, dt, n in zip(ents, dts, sizes):
        w.write(e.key, dt, e.shape, meter.take(stream, n, e.key))
    w.close({CUSTOM_KEY: {"config": ck.config.to_dict(), "source_format": ck.format}})
    return len(ents), sum(sizes)


def write_safetensors(
    ck: Checkpoint, tmpdir: str, dtype: str, max_shard: int | None, progress: Progress | None
) -> tuple[int, int, list[str]]:
    plan = []  # (hf key, dtype, shape, entry, addr)
    for e in ck.entries():
        dt = _target_dtype(ck, e, dtype)
        plan += [(k, dt, e.hf_shape, e, addr) for k, addr in e.hf_keys()]
    specs = [(k, dt, shape) for k, dt, shape, _, _ in plan]
    sizes = [int(np.prod(s)) * np.dtype(dt).itemsize for _, dt, s in specs]
    total = sum(sizes)
    shards = safetensors_io.plan_shards(specs, max_shard)
    names = safetensors_io.shard_names(len(shards))
    order = [i for idx in shards for i in idx]
    stream = background(c for i in order for c in ck.hf_chunks(plan[i][3], plan[i][4], plan[i][1]))
    meter = _Meter(total, progress)
    weight_map = {}
    with contextlib.closing(stream):
        for name, idx in zip(names, shards):
            with open(os.path.join(tmpdir, name), "wb") as f:
                safetensors_io.write_file(
                    f,
                    [specs[i] for i in idx],
                    (meter.take(stream, sizes[i], specs[i][0]) for i in idx),
                )
            weight_map.update({specs[i][0]: name for i in idx})
    if len(names) > 1:
        with open(os.path.join(tmpdir, safetensors_io.INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    return len(specs), total, names


def convert(
    src: str | Checkpoint,
    dst: str,
    to: str,
    config: PaliGemmaConfig | str | None = None,
    dtype: str = "keep",
    max_shard_size: str | int | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict:
    """Convert `src` (any supported format) to `to` ('npz', 'safetensors' or 'orbax') at `dst`; returns a
    report."""
    if to not in FORMATS:
        raise OutputError(f"--to must be npz, safetensors or orbax, not {to!r}")
    if dtype != "keep" and dtype not in dtypes.FLOAT_DTYPES:
        raise OutputError(f"--dtype must be keep, float32, bfloat16 or float16, not {dtype!r}")
    try:
        max_shard = safetensors_io.parse_size(max_shard_size)
    except ValueError as e:
        raise OutputError(str(e)) from None
    if max_shard is not None and max_shard <= 0:
        raise UsageError(f"--max-shard-size must be > 0, got {max_shard_size!r} (omit it for one file)")
    dst = os.path.abspath(dst)
    if os.path.lexists(dst) and not overwrite:  # fail before reading anything
        raise OutputError(describe(dst, what="output exists; pass --overwrite to replace it"))
    t0 = time.perf_counter()
    notes: list[str] = []
    memory.reuse_large_allocations()
    # An already open Checkpoint (e.g. parity.train_output's, with a training step's leaves in place of the
    # file's) is written as it is and left open for its owner.
    with contextlib.nullcontext(src) if isinstance(src, Checkpoint) else open_checkpoint(src, config) as ck:
        cfg = ck.config
        notes += ck.notes
        src_dtypes = sorted({dtypes.name(ck.dtype(e)) for e in ck.entries()})
        if dtype != "keep" and any(
            dtypes.FLOAT_DTYPES[d].itemsize > dtypes.FLOAT_DTYPES[dtype].itemsize
            or (d, dtype) in (("float16", "bfloat16"), ("bfloat16", "float16"))
            for d in src_dtypes
        ):
            notes.append(f"lossy: values rounded from {'/'.join(src_dtypes)} to {dtype}")
        if to in ("npz", "orbax") and ck.format == "safetensors":
            notes.append(
                f"lossy: dropped the {cfg.hf_vocab_rows - cfg.text.vocab_size} HF vocabulary padding "
                f"rows of embed_tokens (ids {cfg.text.vocab_size}..{cfg.hf_vocab_rows - 1}, incl. "
                f"<image>); big_vision's table has {cfg.text.vocab_size} rows"
            )
        if to == "npz":
            side = sidecar_path(dst)
            if os.path.lexists(side) and not overwrite:
                raise OutputError(describe(side, what="sidecar exists; pass --overwrite to replace it"))
            with atomic_output(side, False, overwrite) as side_tmp:
                with open(side_tmp, "w") as f:
                    f.write(cfg.to_json())
                with atomic_output(dst, False, overwrite) as tmp:
                    n, nbytes = write_npz(ck, tmp, dtype, progress)
                    ck.verify_read()
            files = [dst, side]
        elif to == "orbax":
            with atomic_output(dst, True, overwrite) as tmp:
                n, nbytes = write_orbax(ck, tmp, dtype, progress)
            files = [dst]
        else:
            if ck.format != "safetensors":
                notes.append(
                    f"added {cfg.hf_vocab_rows - cfg.text.vocab_size} HF vocabulary padding rows to "
                    f"embed_tokens (ids {cfg.text.vocab_size}..{cfg.hf_vocab_rows - 1}), each the mean "
                    f"embedding row; converting back drops them"
                )
            out_dtype = dtype if dtype != "keep" else src_dtypes[0] if len(src_dtypes) == 1 else "float32"
            with atomic_output(dst, True, overwrite) as tmp:
                n, nbytes, names = write_safetensors(ck, tmp, dtype, max_shard, progress)
                ck.verify_read()
                with open(os.path.join(tmp, "config.json"), "w") as f:
                    json.dump(to_hf_config(cfg, out_dtype), f, indent=2)
            files = [
                os.path.join(dst, x) for x in names + (["model.safetensors.index.json"] if len(names) > 1 else [])
            ] + [os.path.join(dst, "config.json")]
        return {
            "source": {"path": os.path.abspath(ck.path), "format": ck.format, "dtypes": src_dtypes},
            "destination": {
                "path": dst,
                "format": to,
                "files": files,
                "dtype": dtype if dtype != "keep" else "/".join(src_dtypes),
            },
            "config": cfg.name,
            "config_source": ck.config_source,
            "tensors": n,
            "bytes": nbytes,
            "seconds": round(time.perf_counter() - t0, 3),
            "notes": notes,
            "lossy": any(x.startswith("lossy: ") for x in notes),
            "lossy_steps": [x[len("lossy: ") :] for x in notes if x.startswith("lossy: ")],
        }
