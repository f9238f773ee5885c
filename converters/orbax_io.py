"""Orbax checkpoints: big_vision's parameter tree in OCDBT + zarr, read and written array by array.

Layout we write (what `ocp.StandardCheckpointer().save(path, params)` writes for a tree of numpy arrays, so
`ocp.StandardCheckpointer().restore(path)` returns big_vision's params):
    path/_METADATA             the tree: {"('img', 'embedding', 'kernel')": {key_metadata, value_metadata}, ...}
    path/_CHECKPOINT_METADATA  StandardCheckpointHandler, custom_metadata {"paligemma_parity": {"config": ...,
                               "crc32": {key: CRC-32 of the array's C-order bytes}}}
    path/manifest.ocdbt, d/    one OCDBT key-value store; each array a zarr v2 array under `img.embedding.kernel`
    path/commit_success.txt
Chunks are stored uncompressed (zarr `"compressor": null`; orbax reads any zarr compressor): on random-like bf16
weights orbax's default zstd level 1 saves little and made reading 2-4x slower here (`compression="zstd"` writes it).
The nested keys are the spec's canonical keys split at `/` (stacked layers, the 257152-row embedding). Arrays are
chunked in the converters' blocks (converters.blocks, at most 64 MiB) (a layer, a layer piece, or row blocks of
one), so a layer or a row block is read without decoding anything else.

Read: StandardCheckpointer / PyTreeCheckpointer output, OCDBT or per-array zarr directories, zarr v2 or v3, with or
without a top-level `params` key, float32 / float16 / bfloat16. Arrays whose chunks are larger than what is asked
(orbax's default: one chunk per array) are decoded once per chunk and served from a one-slot cache, so memory is
bounded by the largest chunk, never by the model. zarr and orbax keep no checksums, so ours carry a CRC-32 per
array, verified whenever an array is read front to back (as the converters do), like the npz members' CRC.

tensorstore is imported only here, and only when an orbax path is touched; orbax itself is never needed to read or
write (tests restore our output with orbax, and read orbax's output with this module).
"""

from __future__ import annotations

import ast
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from converters import dtypes
from converters.blocks import block_shape
from converters.rawio import crc32
from converters.reader import TensorReader, scan
from parity.errors import CheckpointError, describe

METADATA = "_METADATA"
CHECKPOINT_METADATA = "_CHECKPOINT_METADATA"
COMMIT = "commit_success.txt"
OCDBT_MANIFEST = "manifest.ocdbt"
HANDLER = "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler"
CUSTOM_KEY = "paligemma_parity"
TMP_MARKER = ".orbax-checkpoint-tmp"  # orbax's name for a checkpoint not yet committed
PARAMS = "params"
ZARR_DTYPES = {np.dtype(np.float32): "<f4", np.dtype(np.float16): "<f2", dtypes.BF16: "bfloat16"}
_OCDBT_CONFIG = {
    "max_inline_value_bytes": 1024,
    "max_decoded_node_bytes": 100000000,
    "version_tree_arity_log2": 4,
    "compression": {"id": "zstd"},
}  # orbax's settings


def is_orbax_dir(path: str) -> bool:
    """A directory holding orbax's tree metadata (stdlib only: detection never imports tensorstore)."""
    return os.path.isdir(path) and (
        os.path.exists(os.path.join(path, METADATA)) or os.path.exists(os.path.join(path, CHECKPOINT_METADATA))
    )


def _ts():
    try:
        import tensorstore
    except ImportError as e:
        raise CheckpointError(
            f"orbax checkpoints need tensorstore: pip install 'paligemma-parity[jax]' ({e})"
        ) from None
    return tensorstore


def _box(shape: tuple[int, ...], start: int, count: int) -> tuple[slice, ...] | None:
    """The index box of elements [start, start + count) of a C-order array, if that range is one box."""
    for k in range(len(shape)):
        inner = int(np.prod(shape[k + 1 :], dtype=np.int64))
        if count % inner or start % inner:
            continue
        outer, a = divmod(start // inner, shape[k])
        n = count // inner
        if a + n > shape[k]:
            continue
        prefix = []
        for d in reversed(shape[:k]):
            outer, i = divmod(outer, d)
            prefix.append(slice(i, i + 1))
        return tuple(reversed(prefix)) + (slice(a, a + n),)
    return None


# -- reading ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArrayInfo:
    name: str  # the key in the store: '.'-joined tree path
    dtype: np.dtype
    shape: tuple[int, ...]
    chunks: tuple[int, ...]


def _next_box(box: tuple[tuple[int, int], ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...] | None:
    """The region after `box` in C order, with the same extent on each of its axes (cut at the array's end);
    None after the last."""
    out = list(box)
    for j in range(len(box) - 1, -1, -1):
        lo, hi = box[j]
        if hi < shape[j]:
            out[j] = (hi, min(shape[j], hi + hi - lo))
            return tuple(out)
        out[j] = (0, min(shape[j], hi - lo))
    return None


class OrbaxReader(TensorReader):
    """Lazy view of an orbax checkpoint directory. `keys()` are '/'-joined tree paths without a top `params`."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.abspath(os.fspath(path))
        if TMP_MARKER in os.path.basename(self.path):
            raise CheckpointError(
                describe(
                    self.path,
                    what="an orbax checkpoint that was never committed "
                    f"(name contains {TMP_MARKER}); interrupted write",
                )
            )
        meta = self._json(METADATA)
        tree = meta.get("tree_metadata") if isinstance(meta, dict) else None
        if not isinstance(tree, dict) or not tree:
            raise CheckpointError(
                describe(self.path, METADATA, "an orbax tree_metadata object", "none", "not an orbax PyTree checkpoint")
            )
        self.use_ocdbt = bool(meta.get("use_ocdbt", True))
        self.use_zarr3 = bool(meta.get("use_zarr3", False))
        if self.use_ocdbt and not os.path.exists(os.path.join(self.path, OCDBT_MANIFEST)):
            raise CheckpointError(
                describe(
                    self.path,
                    OCDBT_MANIFEST,
                    "an OCDBT manifest",
                    "absent",
                    "truncated or uncommitted orbax checkpoint",
                )
            )
        paths = [self._tree_path(k, v) for k, v in tree.items()]
        self.prefix = PARAMS + "/" if all(p[0] == PARAMS and len(p) > 1 for p in paths) else ""
        self.names = {"/".join(p)[len(self.prefix) :]: ".".join(p) for p in paths}
        ts = _ts()
        self._ts = ts
        self._ctx = ts.Context({"cache_pool": {"total_bytes_limit": 0}, "data_copy_concurrency": {"limit": 2}})
        self._stores: dict[str, object] = {}
        self.arrays: dict[str, ArrayInfo] = {k: self._open(k) for k in self.names}
        self._cache: tuple[str, tuple, np.ndarray] | None = None
        self._ahead: dict[tuple[str, tuple], object] = {}  # (key, box) -> tensorstore read future
        self.custom_metadata = self._custom_metadata()
        ours = self.custom_metadata.get(CUSTOM_KEY)
        crcs = ours.get("crc32") if isinstance(ours, dict) else None
        self._crc = {k: [int(crcs[k]), 0, 0] for k in self.arrays if isinstance(crcs, dict) and k in crcs}

    def _json(self, name: str):
        p = os.path.join(self.path, name)
        try:
            with open(p) as f:
                return json.load(f)
        except FileNotFoundError:
            raise CheckpointError(
                describe(self.path, name, "orbax metadata file", "absent", "truncated or not an orbax checkpoint")
            ) from None
        except (OSError, ValueError) as e:
            raise CheckpointError(describe(p, what=f"unreadable orbax metadata ({e})")) from None

    def _tree_path(self, text: str, v) -> tuple[str, ...]:
        keys = v.get("key_metadata") if isinstance(v, dict) else None
        if keys is None:
            try:
                keys = [{"key": k, "key_type": 2} for k in ast.literal_eval(text)]
            except (ValueError, SyntaxError):
                raise CheckpointError(describe(self.path, text, what="unreadable tree path in _METADATA")) from None
        if not keys or any(not isinstance(k, dict) or k.get("key_type", 2) != 2 for k in keys):
            raise CheckpointError(
                describe(
                    self.path,
                    text,
                    "nested dicts of parameter names",
                    "a sequence index",
                    "not a PaliGemma parameter tree",
                )
            )
        vt = (v.get("value_metadata") or {}).get("value_type", "np.ndarray")
        if vt not in ("np.ndarray", "jax.Array"):
            raise CheckpointError(
                describe(
                    self.path, "/".join(str(k["key"]) for k in keys), "an array", vt, "not a PaliGemma parameter tree"
                )
            )
        return tuple(str(k["key"]) for k in keys)

    def _spec(self, name: str) -> dict:
        if self.use_ocdbt:
            kv = {"driver": "ocdbt", "base": f"file://{self.path}", "path": name + "/"}
        else:
            kv = {"driver": "file", "path": os.path.join(self.path, name) + "/"}
        return {"driver": "zarr3" if self.use_zarr3 else "zarr", "kvstore": kv}

    def _open(self, key: str) -> ArrayInfo:
        name = self.names[key]
        try:
            t = self._ts.open(self._spec(name), open=True, read=True, context=self._ctx).result()
        except Exception as e:  # tensorstore raises ValueError/RuntimeError with a long status text
            raise CheckpointError(
                describe(self.path, key, what=f"array missing or unreadable in the checkpoint ({_first_line(e)})")
            ) from None
        dt = np.dtype(t.dtype.numpy_dtype)
        if dt not in ZARR_DTYPES:
            raise CheckpointError(
                describe(self.path, key, "float32, float16 or bfloat16", str(dt), "unsupported dtype")
            )
        self._stores[key] = t
        chunks = tuple(int(c) for c in t.chunk_layout.read_chunk.shape or t.shape)
        return ArrayInfo(name, dt, tuple(int(s) for s in t.shape), chunks)

    def _custom_metadata(self) -> dict:
        p = os.path.join(self.path, CHECKPOINT_METADATA)
        if not os.path.exists(p):
            return {}
        d = self._json(CHECKPOINT_METADATA)
        return (d.get("custom_metadata") or {}) if isinstance(d, dict) else {}

    def config_dict(self) -> dict | None:
        """Our config, stored as orbax custom metadata by `OrbaxWriter`, if present."""
        c = self.custom_metadata.get(CUSTOM_KEY)
        return c.get("config") if isinstance(c, dict) else None

    def keys(self) -> list[str]:
        return list(self.arrays)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.arrays[key].shape

    def dtype(self, key: str) -> np.dtype:
        return self.arrays[key].dtype

    def verify_all(self) -> None:
        """Finish the CRC-32 check (ours, in the custom metadata) of every array not yet read front to back."""
        for key, state in self._crc.items():
            a = self.arrays[key]
            if state[1] != int(np.prod(a.shape, dtype=np.int64)) * a.dtype.itemsize:
                state[1:] = [0, 0]
                scan(self, key, lambda _: None)

    def read(self, key: str, index: tuple[int, ...] = (), rows: tuple[int, int] | None = None) -> np.ndarray:
        """The array, `array[index]` for leading integer indices, or rows [a, b) of the first axis after them."""
        a = self.arrays[key]
        box = [(i, i + 1) for i in index]
        if rows is not None:
            box.append(rows)
        for (lo, hi), n in zip(box, a.shape):
            if not 0 <= lo < hi <= n:
                raise IndexError(f"{key}: {index} {rows} out of range for shape {a.shape}")
        outer = tuple((lo // c * c, min(n, -(-hi // c) * c)) for (lo, hi), c, n in zip(box, a.chunks, a.shape))
        if tuple(box) == outer:
            out = self._read_box(key, outer)
        else:  # the chunk is larger than what is asked: decode it once, serve slices from it
            if self._cache is None or self._cache[:2] != (key, outer):
                self._cache = None
                self._cache = (key, outer, self._read_box(key, outer))
            sl = tuple(slice(lo - o, hi - o) for (lo, hi), (o, _) in zip(box, outer))
            out = np.array(self._cache[2][sl])
        out = out.reshape(tuple(hi - lo for lo, hi in box[len(index) :]) + a.shape[len(box) :])
        if key in self._crc:
            self._crc_update(key, a, box, out)
        return out

    def _crc_update(self, key: str, a: ArrayInfo, box, out: np.ndarray) -> None:
        """Verify the stored CRC-32 when the array has been read front to back (out-of-order reads skip)."""
        state = self._crc[key]  # [expected, bytes verified so far, running crc]
        start = 0
        for (lo, _), n in zip(box, a.shape):
            start = start * n + lo
        start *= int(np.prod(a.shape[len(box) :], dtype=np.int64)) * a.dtype.itemsize
        if start != state[1]:
            return
        state[2] = crc32(memoryview(np.ascontiguousarray(out).reshape(-1).view(np.uint8)), state[2])
        state[1] += out.nbytes
        if state[1] == int(np.prod(a.shape, dtype=np.int64)) * a.dtype.itemsize and state[2] != state[0]:
            raise CheckpointError(
                describe(self.path, key, f"CRC-32 {state[0]:08x}", f"{state[2]:08x}", "corrupt array data")
            )

    def _read_box(self, key: str, box) -> np.ndarray:
        """The region `box` ((lo, hi) per leading axis) of array `key`. The next region of the same shape in C
        order is requested before this one is awaited (the converters read arrays front to back), so tensorstore's
        threads read it while the caller transposes and writes this one: at most one region in flight ahead."""
        fut = self._ahead.pop((key, box), None)
        for stale in self._ahead.values():
            stale.cancel()
        self._ahead.clear()
        try:
            if fut is None:
                fut = self._start(key, box)
            nxt = _next_box(box, self.arrays[key].shape)
            if nxt is not None:
                self._ahead[(key, nxt)] = self._start(key, nxt)
            x = fut.result()
        except Exception as e:
            raise CheckpointError(
                describe(self.path, key, what=f"corrupt or truncated array data ({_first_line(e)})")
            ) from None
        return np.asarray(x)

    def _start(self, key: str, box):
        return self._stores[key][tuple(slice(lo, hi) for lo, hi in box)].read()

    def close(self) -> None:
        for fut in self._ahead.values():
            fut.cancel()
        self._ahead.clear()
        self._stores.clear()
        self._cache = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _first_line(e: Exception) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:300]


# -- writing ---------------------------------------------------------------------------------------------------
class OrbaxWriter:
    """Writes an orbax checkpoint into an empty directory `path`, array by array, each array from consecutive
    C-order chunks (layers, layer pieces, row blocks); `close()` writes the metadata that makes it a checkpoint.
    Callers write into a temporary directory and rename it when `close()` returned (converters.convert)."""

    def __init__(self, path: str | os.PathLike, compression: str | None = None, in_flight: int = 1):
        ts = _ts()
        self.path = os.path.abspath(os.fspath(path))
        self._ts = ts
        self._ctx = ts.Context({"cache_pool": {"total_bytes_limit": 0}, "data_copy_concurrency": {"limit": 2}})
        self._kv = {"driver": "ocdbt", "base": f"file://{self.path}", "config": _OCDBT_CONFIG}
        self._compressor = {"id": "zstd", "level": 1} if compression == "zstd" else None
        self._in_flight = in_flight
        self._keys: list[tuple[str, ...]] = []
        self.crc32: dict[str, int] = {}
        self._t0 = time.time_ns()

    def write(self, key: str, dtype: np.dtype, shape: tuple[int, ...], chunks: Iterable[np.ndarray]) -> int:
        dtype = np.dtype(dtype)
        tree_path = tuple(key.split("/"))
        name = ".".join(tree_path)
        meta = {
            "shape": list(shape),
            "chunks": list(block_shape(tuple(shape), dtype.itemsize)),
            "dtype": ZARR_DTYPES[dtype],
            "compressor": self._compressor,
            "fill_value": None,
            "order": "C",
            "filters": None,
            "dimension_separator": ".",
        }
        t = self._ts.open(
            {"driver": "zarr", "kvstore": dict(self._kv, path=name + "/"), "metadata": meta},
            create=True,
            context=self._ctx,
        ).result()
        total = int(np.prod(shape, dtype=np.int64))
        done, pending, crc = 0, [], 0
        for c in chunks:
            if c.dtype != dtype:
                raise TypeError(f"{key}: chunk dtype {c.dtype}, expected {dtype}")
            box = _box(tuple(shape), done, c.size)
            if box is None:
                raise ValueError(f"{key}: a chunk of {c.size} elements at {done} is not a block of {list(shape)}")
            c = np.ascontiguousarray(c)
            crc = crc32(memoryview(c.reshape(-1).view(np.uint8)), crc)
            pending.append(t[box].write(c.reshape(tuple(s.stop - s.start for s in box) + tuple(shape[len(box) :]))))
            done += c.size
            while len(pending) > self._in_flight:
                pending.pop(0).result()
        for f in pending:
            f.result()
        if done != total:
            raise ValueError(f"{key}: wrote {done} elements, expected {total} for {list(shape)}")
        self._keys.append(tree_path)
        self.crc32[key] = crc
        return total * dtype.itemsize

    def close(self, custom_metadata: dict | None = None) -> None:
        """`custom_metadata` goes into _CHECKPOINT_METADATA, with the arrays' CRC-32s under CUSTOM_KEY."""
        custom_metadata = dict(custom_metadata or {})
        custom_metadata[CUSTOM_KEY] = dict(custom_metadata.get(CUSTOM_KEY, {}), crc32=self.crc32)
        tree = {
            str(p): {
                "key_metadata": [{"key": k, "key_type": 2} for k in p],
                "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False},
            }
            for p in self._keys
        }
        _write_json(
            os.path.join(self.path, METADATA),
            {
                "tree_metadata": tree,
                "use_ocdbt": True,
                "use_zarr3": False,
                "store_array_data_equal_to_fill_value": True,
                "custom_metadata": None,
            },
        )
        _write_json(
            os.path.join(self.path, CHECKPOINT_METADATA),
            {
                "item_handlers": HANDLER,
                "metrics": {},
                "performance_metrics": {},
                "init_timestamp_nsecs": self._t0,
                "commit_timestamp_nsecs": time.time_ns(),
                "custom_metadata": custom_metadata or {},
            },
        )
        with open(os.path.join(self.path, COMMIT), "w") as f:
            f.write("Checkpoint commit was successful")


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)
