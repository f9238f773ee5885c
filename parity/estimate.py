"""What a run will need in memory, worked out before anything is loaded, and the refusal when it will not fit.

Framework-free (neither torch nor jax): from a config, the compute dtype, the batch and the sequence lengths it
computes one side's peak resident set, itemised (docs/memory.md explains every term and how it was measured):

  runtime      the framework once imported, plus its first forward's own buffers (measured per implementation)
  weights      the spec's parameter count x the compute dtype's size
  load copy    what loading holds beside the weights. torch and jax (BLOCK_LOADERS) fill their tensors from a stream
               of blocks (parity.param_blocks: at most converters.blocks.BLOCK_BYTES each in the checkpoint's
               dtype, or --dtype when it differs from the compute dtype): one block as read, its cast and (jax)
               its device copy, gone before the forward. Other backends are handed the whole numpy dict (in the
               checkpoint's dtype) beside their own tensors and keep it through the run
  activations  the largest live set of the forward: attention scores and probabilities [B, N, S, S] float32, the
               MLP hidden [B, S, F] (gate, up, product), a few residual-width tensors, the logits [B, S, V]
  kv cache     generation: [L, B, S + new, K, H] x 2 in the compute dtype
  outputs      every captured point is held (float32, plus the compute-dtype tensor when that differs) until the
               capture file is written in one go; step logits and cache points of a generation file likewise

torch and jax: peak = runtime + weights + max(load copy, run); other backends: runtime + weights + load copy + run.
Measured: docs/memory.md ("Resident runs": 3B float32, 1.09x / 1.13x the model).

A compare runs each side in its own process, one after the other (parity.compare.sides): its peak is the larger
side plus the comparing process, which reads the two captures one point at a time.

The block-streamed figure (issue 24 §1: 1 GB + 2 x the largest unit in the compute dtype, plus activations and
outputs) is what a streamed run (parity.stream) needs: `check_fits` streams a capture, generation, golden check,
compare side or float32 training step that would not fit resident but fits streamed (one line says so), and
refuses one that fits neither way.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

import numpy as np

from converters.blocks import BLOCK_BYTES
from parity import points as pts
from parity import spec
from parity.config import PaliGemmaConfig
from parity.errors import ParityError, UsageError

GB = 1e9
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
# Resident set of the imported framework and its first forward (measured, docs/memory.md; rounded up).
RUNTIME = {"torch": 0.45 * GB, "jax": 0.55 * GB, "transformers": 0.80 * GB}  # measured + ~25% (docs/memory.md)
BLOCK_LOADERS = ("torch", "jax")  # load block by block: no numpy copy of the model (parity.param_blocks)
KEEPS_LOAD_COPY = {"torch": False, "jax": False, "transformers": True}
SLACK = 1.10  # allocator fragmentation, inputs, small buffers: applied to everything but the runtime
STREAM_BASE = 1.0 * GB  # issue 24 §1's target: 1 GB + 2 x the largest unit
COMPARING_PROCESS = 0.15 * GB  # the comparing process (numpy, the report) besides its point buffers
KINDS = ("capture", "side", "generate", "golden", "train")
ENV_LIMIT = "PARITY_MEMORY_LIMIT"
ENV_CHECK = "PARITY_MEMORY_CHECK"  # "off": skip the check
ENV_ROOT = "PARITY_MEMORY_ROOT"  # a fake / for /proc and /sys (tests)
STREAMED_IMPLS = ("torch", "jax")  # the implementations with a streaming hook (parity.stream.HOOKS)
STREAMED_KINDS = ("capture", "side", "generate", "golden", "train")  # train: float32 only (parity.stream_train)


class MemoryRefused(ParityError):
    """A run that would not fit in the memory available (refused before anything is loaded)."""


@dataclasses.dataclass(frozen=True)
class Work:
    """What a run does after loading: `kind` capture (`points`: globs, None = all), side (a compare's run side;
    `teacher`: also runs its blocks on the other side's capture), generate (`new_tokens`; `step_logits` and
    `cache_points` when they are written out), golden (capture of every point, then `new_tokens` steps) or train
    (a fine-tuning step: `trainable` parameters get gradients, `frozen_copy` parameters are held a second time by
    --frozen-dtype float16)."""

    kind: str = "capture"
    points: tuple[str, ...] | str | None = None
    new_tokens: int = 0
    step_logits: bool = False
    cache_points: bool = False
    teacher: bool = False
    trainable: int = 0
    frozen_copy: int = 0


@dataclasses.dataclass(frozen=True)
class Estimate:
    """One process's peak, itemised (bytes); `peak` = the runtime + the items as the implementation combines them."""

    impl: str
    dtype: str
    items: dict[str, int]
    peak: int
    streamed: int  # the block-streamed figure
    stream: bool = False  # check_fits' choice: run block-streamed
    note: str | None = None  # the one line saying why it streams (an automatic choice)

    def brief(self) -> str:
        parts = ", ".join(f"{k} {gb(v)}" for k, v in self.items.items() if v)
        return f"{gb(self.peak)} ({parts})"


def gb(n: float) -> str:
    if n < 0.1 * GB:
        return f"{n / 1e6:.1f} MB"
    return f"{n / GB:.2f} GB" if n < 10 * GB else f"{n / GB:.1f} GB"


def _prod(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


def largest_unit(cfg: PaliGemmaConfig) -> int:
    """Parameters of the largest unit a block-streamed run holds: a ViT block, a Gemma block, the projector (the
    embedding is read by rows and the tied head in row chunks, so neither is a unit)."""
    per_layer: dict[str, int] = {}
    for e in spec.entries(cfg):
        group = e.key.split("/")[0] if e.layers is not None else e.key
        n = _prod(e.shape[1:]) if e.layers is not None else _prod(e.shape)
        if e.key != "llm/embedder/input_embedding":
            per_layer[group] = per_layer.get(group, 0) + n
    return max(per_layer.values())


def estimate(
    cfg: PaliGemmaConfig,
    impl: str,
    dtype: str,
    batch: int,
    text_len: int,
    work: Work = Work(),
    held_itemsize: float | None = None,
    device: str = "cpu",
) -> Estimate:
    """One run side's peak resident set on the host. `held_itemsize`: bytes per parameter as the loader reads
    them (the checkpoint's dtype, or --dtype when it differs from the compute dtype); default: the compute dtype's.
    On an accelerator `device` the weights, activations and kv cache live in its memory, which is not estimated
    here: the host's peak is the runtime, the load copy and the outputs."""
    if work.kind not in KINDS:
        raise ValueError(f"kind {work.kind!r}; one of {', '.join(KINDS)}")
    c = ITEMSIZE[dtype]
    v, t = cfg.vision, cfg.text
    n_params = spec.param_count(cfg)
    largest = max(_prod(e.shape) for e in spec.entries(cfg))
    B, T = batch, cfg.num_image_tokens
    S = T + text_len
    new = work.new_tokens if work.kind in ("generate", "golden") else 0
    Sk = S + new
    weights = n_params * c
    held_size = held_itemsize or c
    if impl in BLOCK_LOADERS:  # one block as read; jax also its host cast and its device copy (torch's copy_ casts)
        block = min(largest, int(BLOCK_BYTES // held_size))
        load_copy = int(block * (held_size + ((c if held_size != c else 0) + c if impl == "jax" else 0)))
    else:
        load_copy = int(n_params * held_size)
    vit = 2 * B * v.num_heads * T * T * 4 + 2 * B * T * v.mlp_dim * c + 4 * B * T * v.width * c
    llm = 2 * B * t.num_heads * S * Sk * 4 + 3 * B * S * t.mlp_dim * c + 4 * B * S * t.width * c + 2 * B * S * Sk
    capture = work.kind in ("capture", "side", "golden")
    head = B * S * t.vocab_size * (c if capture else c + 4)  # captured logits are counted in outputs
    activations = max(vit, llm, head)

    kv = 2 * t.depth * B * Sk * t.num_kv_heads * t.head_dim * c if new else 0
    outputs = 0
    if capture:
        chosen = pts.select(pts.forward_points(cfg), None if work.kind == "golden" else work.points)
        shapes = pts.shapes(cfg, B, text_len)
        outputs = sum(_prod(shapes[p]) for p in chosen) * (4 + (c if c != 4 else 0))
        if work.teacher:  # side B's units on side A's inputs: a second set of block and unit outputs
            units = pts.graph_units(cfg)
            outputs += sum(_prod(shapes[p]) for p in chosen if "/block" in p or "/layer" in p or p in units) * 4
    if new and (work.step_logits or work.kind == "golden"):
        outputs += B * new * t.vocab_size * 4
    if new and (work.cache_points or work.kind == "golden"):
        outputs += 2 * t.depth * B * Sk * t.num_kv_heads * t.head_dim * 4
    if work.kind == "train":
        # saved for the backward pass through every LLM layer (the ViT's too when one of its leaves trains), the
        # text logits with their log-softmax and its gradient; the trainable leaves' gradients and the two float32
        # copies the result carries out (first-step gradients, updated leaves); --frozen-dtype float16's copy.
        per_layer = 6 * B * S * t.width + 3 * B * S * t.mlp_dim + 2 * B * t.num_heads * S * S
        activations = t.depth * per_layer * c + 3 * B * text_len * t.vocab_size * 4 + vit
        outputs = 3 * work.trainable * 4 + work.frozen_copy * c
    run = streamed_run = activations + kv + outputs
    if work.kind == "train":  # streamed (parity.stream_train): every unit's input, one unit's saved activations, the
        # text logits and their gradient; the trainable leaves held, their gradients, the first ones, the updated ones
        units_in = (v.depth + t.depth + 6) * B * S * max(v.width, t.width) * 4
        streamed_run = units_in + per_layer * c + 3 * B * text_len * t.vocab_size * 4 + vit + 4 * work.trainable * 4
    runtime = int(RUNTIME.get(impl, RUNTIME["transformers"]))
    keeps = KEEPS_LOAD_COPY.get(impl, True)
    dynamic = weights + (load_copy + run if keeps else max(load_copy, run))
    if str(device).split(":")[0] != "cpu":
        dynamic = load_copy + outputs
    items = {
        "runtime": runtime,
        "weights": weights,
        "load copy": load_copy,
        "activations": activations,
        "kv cache": kv,
        "outputs": outputs,
    }
    streamed = int(STREAM_BASE + SLACK * (2 * largest_unit(cfg) * c + streamed_run))
    return Estimate(impl, dtype, items, int(runtime + SLACK * dynamic), streamed)


def comparing(a: Estimate, b: Estimate, cfg: PaliGemmaConfig, batch: int, text_len: int) -> int:
    """A compare's peak: its sides run one after the other in their own processes, beside the comparing process
    (which then reads the two sides' captures, and a teacher-forced one, a point at a time: float32, statistics
    in chunks)."""
    largest_point = max(
        _prod(s) for s in pts.shapes(cfg, batch, text_len).values() if all(isinstance(x, int) for x in s)
    )
    return int(COMPARING_PROCESS + 3 * largest_point * 4 + max(a.peak, b.peak))


# -- what the machine has -------------------------------------------------------------------------------------------
SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'2G', '512M', '1.5GiB', '3000000000' -> bytes (binary units, as `free` and cgroups count)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise MemoryRefused(f"{ENV_LIMIT}={text!r}: expected a size such as 2G, 512M or a number of bytes")
    return int(float(m.group(1)) * SUFFIX[m.group(2).upper()])


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _stat(text: str | None) -> dict[str, int]:
    out = {}
    for line in (text or "").splitlines():
        parts = line.replace(":", " ").split()
        if len(parts) >= 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1]) * (1024 if parts[2:3] == ["kB"] else 1)
    return out


def _cgroup_dirs(root: str) -> list[tuple[str, str]]:
    """(version, directory) of this process's memory cgroup and its ancestors, innermost first."""
    out: list[tuple[str, str]] = []
    for line in (_read(os.path.join(root, "proc/self/cgroup")) or "").splitlines():
        hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hid == "0" and controllers == "":
            version, base = "v2", os.path.join(root, "sys/fs/cgroup")
        elif "memory" in controllers.split(","):
            version, base = "v1", os.path.join(root, "sys/fs/cgroup/memory")
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for i in range(len(parts), -1, -1):
            out.append((version, os.path.join(base, *parts[:i])))
    return out


def cgroup_available(root: str = "/") -> int | None:
    """The tightest cgroup limit minus what the group uses (less its reclaimable inactive file cache); None when
    no limit is set. v2: memory.max / memory.current; v1: memory.limit_in_bytes / memory.usage_in_bytes."""
    best = None
    for version, d in _cgroup_dirs(root):
        names = (
            ("memory.max", "memory.current") if version == "v2" else ("memory.limit_in_bytes", "memory.usage_in_bytes")
        )
        limit, used = (_read(os.path.join(d, n)) for n in names)
        if limit is None or used is None or not limit.strip().isdigit() or not used.strip().isdigit():
            continue
        if int(limit) >= 1 << 60:  # v1's "no limit" is a huge number
            continue
        stat = _stat(_read(os.path.join(d, "memory.stat")))
        cache = stat.get("inactive_file", stat.get("total_inactive_file", 0))
        free = max(0, int(limit) - max(0, int(used) - cache))
        best = free if best is None else min(best, free)
    return best


def available(root: str | None = None, env: Mapping[str, str] | None = None) -> tuple[int | None, str]:
    """(bytes, where from): what this process may grow to, the smallest of MemAvailable and the cgroup's room (each
    plus what this process already holds) and $PARITY_MEMORY_LIMIT (a limit on this process's whole resident
    set); (None, why) when none can be read."""
    env = os.environ if env is None else env
    root = root or env.get(ENV_ROOT) or "/"
    have = _rss_now(root)
    held = f" + {gb(have)} this process holds" if have else ""
    found = []
    mem = _stat(_read(os.path.join(root, "proc/meminfo"))).get("MemAvailable")
    if mem is not None:
        found.append((mem + have, f"MemAvailable {gb(mem)}{held}"))
    cg = cgroup_available(root)
    if cg is not None:
        found.append((cg + have, f"cgroup limit: {gb(cg)} free{held}"))
    if env.get(ENV_LIMIT):
        found.append((parse_size(env[ENV_LIMIT]), f"{ENV_LIMIT}={env[ENV_LIMIT]}"))
    if not found:
        return None, "unknown (no /proc/meminfo)"
    return min(found)


def _rss_now(root: str) -> int:
    return _stat(_read(os.path.join(root, "proc/self/status"))).get("VmRSS", 0)


# -- the refusal ----------------------------------------------------------------------------------------------------
def held_itemsize(ckpt, compute: str, dtype: str) -> float:
    """Bytes per parameter as the loader reads them (its blocks, or a whole numpy copy): --dtype when it differs
    from the compute dtype (the loader rounds to it), else the checkpoint's own dtypes (`ckpt`: a converters
    Checkpoint, or an itemsize)."""
    if compute != dtype:
        return ITEMSIZE[dtype]
    if isinstance(ckpt, int | float):
        return ckpt
    entries = list(ckpt.entries())
    n = sum(_prod(e.shape) for e in entries)
    return sum(_prod(e.shape) * ckpt.dtype(e).itemsize for e in entries) / max(n, 1)


def check_fits(
    cfg: PaliGemmaConfig,
    inputs: Mapping[str, np.ndarray],
    impl: str,
    compute: str,
    dtype: str,
    ckpt,
    work: Work | None = None,
    *,
    device: str = "cpu",
    root: str | None = None,
    env: Mapping[str, str] | None = None,
    stream: bool | None = None,
) -> Estimate:
    """The run's estimate, with `stream` set when it is to run block-streamed: asked (`stream` True), or chosen
    (`stream` None; False: resident only) because it would not fit resident but fits streamed (`note`: the line).
    Refuse (MemoryRefused, exit 2, one line: the need, what is available and from where, the way out) a run that
    fits neither way; called before any tensor is read. $PARITY_MEMORY_CHECK=off skips the check. An accelerator's
    own memory is not checked (the framework reports its out-of-memory errors)."""
    env = os.environ if env is None else env
    work = work or Work()
    rows, text_len = (int(n) for n in np.shape(inputs["text"]))
    held = held_itemsize(ckpt, compute, dtype)
    est = estimate(cfg, impl, compute, rows, text_len, work, held, device)
    streamable = impl in STREAMED_IMPLS and work.kind in STREAMED_KINDS
    if stream and not streamable:
        why = f"implementation {impl!r}" if impl not in STREAMED_IMPLS else "a training step"
        raise UsageError(
            f"--stream: {why} does not run block-streamed (streamed: capture, generate, compare sides, golden "
            f"check and training steps, torch and jax)"
        )
    checked = env.get(ENV_CHECK, "").lower() not in ("off", "0", "no", "false")
    limit, source = available(root, env) if checked else (None, "")
    if stream:
        est = dataclasses.replace(est, peak=est.streamed, stream=True)
    elif stream is None and limit is not None and est.peak > limit and streamable and est.streamed <= limit:
        what = {"side": "a compare side", "train": "a training step"}.get(work.kind, work.kind)
        note = (
            f"{cfg.name}: {what} with {impl} {compute} needs {gb(est.peak)} resident but {gb(limit)} is available "
            f"({source}): running block-streamed instead (~{gb(est.streamed)}, one unit's weights at a time)"
        )
        return dataclasses.replace(est, peak=est.streamed, stream=True, note=note)
    if limit is None or est.peak <= limit:
        return est

    def fits(e: Estimate) -> bool:
        return e.peak <= limit

    ways = []
    if work.kind == "train":
        ways.append("fewer --trainable leaves (the default is the LLM's attention)")
    elif compute == "float32":
        stored = held_itemsize(ckpt, "bfloat16", "bfloat16")  # --dtype bfloat16 holds the checkpoint's own dtype
        small = estimate(cfg, impl, "bfloat16", rows, text_len, work, stored, device)
        if fits(small):
            ways.append(f"--dtype bfloat16 needs {gb(small.peak)} (fits; slow on most CPUs)")
    if rows > 1:
        n = next(
            (r for r in range(rows - 1, 0, -1) if fits(estimate(cfg, impl, compute, r, text_len, work, held, device))),
            0,
        )
        if n:
            ways.append(f"fewer rows in the inputs ({n} of {rows} would fit)")
    ways.append(f"a machine with {-(-est.peak // (1 << 30))} GiB available")
    if not est.stream and streamable and stream is False:  # streaming ruled out for this run, not too big
        ways.append(
            "the float16 training modes run resident only" if work.kind == "train" else "block-streaming is off"
        )
    elif not est.stream and streamable:
        ways.append(f"block-streamed it needs {gb(est.streamed)}, more than available too")
    elif not streamable:
        ways.append(
            "a training step does not run block-streamed" if impl in STREAMED_IMPLS else f"{impl} does not stream"
        )
    ways.append(f"{ENV_CHECK}=off runs anyway")
    what = {"side": "a compare side", "train": "a training step"}.get(work.kind, work.kind)
    need = f"{gb(est.peak)} block-streamed" if est.stream else est.brief()
    raise MemoryRefused(
        f"{cfg.name}: {what} with {impl} {compute}, {rows} row{'s' * (rows != 1)} x "
        f"{cfg.num_image_tokens + text_len} tokens needs {need} at peak, "
        f"but {gb(limit)} is available ({source}); way out: {'; '.join(ways)}"
    )


def table(cfg: PaliGemmaConfig, stored: float = 4, rows: int = 1, text_len: int = 128, new_tokens: int = 32) -> dict:
    """`parity inspect`'s estimate: capture / compare (two sides of one implementation, logits only) / generate,
    float32 and bfloat16 (`--dtype`: the loader holds the checkpoint's own dtype, `stored` bytes per parameter),
    resident per implementation and streamed, for `rows` x (image tokens + `text_len`), `new_tokens` generated."""
    out = []
    works = {
        "capture": Work("capture"),
        "compare": Work("side", points=(pts.LOGITS,)),
        "generate": Work("generate", new_tokens=new_tokens),
    }
    for dtype in ("float32", "bfloat16"):
        for run, work in works.items():
            row: dict = {"run": run, "dtype": dtype, "resident_bytes": {}}
            for impl in ("torch", "jax"):
                e = estimate(cfg, impl, dtype, rows, text_len, work, stored)
                streamed = dataclasses.replace(e, peak=e.streamed)
                if run == "compare":
                    e, streamed = (
                        dataclasses.replace(x, peak=comparing(x, x, cfg, rows, text_len)) for x in (e, streamed)
                    )
                row["resident_bytes"][impl] = e.peak
                row.setdefault("items", {})[impl] = e.items
            row["streamed_bytes"] = streamed.peak
            out.append(row)
    return {
        "rows": rows,
        "text_len": text_len,
        "new_tokens": new_tokens,
        "parameters": spec.param_count(cfg),
        "largest_unit_parameters": largest_unit(cfg),
        "notes": [
            "resident: the weights loaded block by block into the framework's tensors (docs/memory.md)",
            "streamed: capture, compare and generate run block-streamed (--stream, or automatically when resident "
            "would not fit); a streamed generate re-reads the weights every token",
            "compare: the sides run one after the other, each in its own process: the larger side + the comparer",
        ],
        "table": out,
    }


def lines(memory: dict) -> list[str]:
    """`table()` as aligned text lines (the CLI's rendering)."""
    head = f"{'run':9s} {'dtype':9s} {'torch':>9s} {'jax':>9s} {'streamed*':>10s}"
    out = [
        f"memory estimate: {memory['rows']} row(s) x (image tokens + {memory['text_len']} text tokens), "
        f"{memory['new_tokens']} generated; peak resident set",
        head,
    ]
    for r in memory["table"]:
        res = r["resident_bytes"]
        out.append(
            f"{r['run']:9s} {r['dtype']:9s} {gb(res['torch']):>9s} {gb(res['jax']):>9s} {gb(r['streamed_bytes']):>10s}"
        )
    return out + memory["notes"][:1] + ["* " + memory["notes"][1]] + memory["notes"][2:]
