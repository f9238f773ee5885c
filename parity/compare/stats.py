"""Statistics of one capture point: side A (the reference) against side B, accumulated in float64.

With d = b - a over the compared elements (finite on both sides; padding positions left out):
  max_abs  = max |d|                     mean_abs = mean |d|
  max_rel  = max |d| / max |a|           rms_rel  = sqrt(sum d^2 / sum a^2)
  cosine   = sum a b / (|a| |b|)         sqnr_db  = 10 log10(sum a^2 / sum d^2)   (inf when d = 0)
  ulp      = max distance in units in the last place of the compared dtype, both values rounded to it
             (float32, bfloat16 or float16): the number of representable values between them, per element (huge
             for elements near zero, where representable values are dense: a policy can bound it, reports show
             scale_ulp)
  scale_ulp = max |d| / ulp(max |a|): the largest error in units in the last place of the point's scale (what
             rounding at the point's magnitude can explain: a few units is rounding, thousands is not)
  worst    = index (in the point's full shape) and both values of the element with the largest |d|
  nan/inf  = counts on each side
Logits (one row of V scores per position) add, over the positions asked for (parity compare: the text positions; the
next-token distribution at image positions is never trained, as MaxText's checker also reasons):
  kl_max / kl_mean  KL(softmax(a) || softmax(b)) in nats, its position
  kl_degenerate     fraction of the positions where both softmaxes are one-hot to float32 resolution (the mass
                    off the top token, 1 - p_top, below float32's epsilon 2^-23 on both sides): KL there is ~0
                    whatever the logits say, so reports label it instead of printing 0.0
  top1              fraction of positions whose argmax agrees
  top5              mean overlap |top5(a) & top5(b)| / 5
Rows are processed in chunks, spread over threads (numpy releases the GIL), so a point never needs more than a few
float64 copies of a chunk per thread.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
from typing import Any

import ml_dtypes
import numpy as np

ONE_HOT_TAIL = 2.0**-23  # float32 epsilon: a softmax whose mass off its top token is below it is one-hot
MANTISSA_BITS = {"float32": 23, "bfloat16": 7, "float16": 10, "float64": 52}
ULP_DTYPES = {
    "float32": (np.float32, np.int32, 0x7FFFFFFF),
    "bfloat16": (ml_dtypes.bfloat16, np.int16, 0x7FFF),
    "float16": (np.float16, np.int16, 0x7FFF),
    "float64": (np.float64, np.int64, 0x7FFFFFFFFFFFFFFF),
}
CHUNK_ELEMENTS = 1 << 20
THREADS = min(8, os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True)
class PointStats:
    shape: tuple[int, ...]
    compared: int  # elements compared (finite on both sides, outside padding)
    max_abs: float
    mean_abs: float
    max_rel: float
    rms_rel: float
    cosine: float
    sqnr_db: float
    ulp: int
    ulp_dtype: str
    worst_index: tuple[int, ...] | None
    worst_a: float | None
    worst_b: float | None
    nan_a: int = 0
    inf_a: int = 0
    nan_b: int = 0
    inf_b: int = 0
    kl_max: float | None = None
    kl_mean: float | None = None
    kl_worst_position: tuple[int, ...] | None = None
    top1: float | None = None
    top5: float | None = None
    scale_ulp: float | None = None
    kl_degenerate: float | None = None  # fraction of the KL positions where both softmaxes are one-hot

    @property
    def nonfinite(self) -> int:
        return self.nan_a + self.inf_a + self.nan_b + self.inf_b

    def get(self, stat: str) -> float | None:
        return getattr(self, stat)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else _json_float(v)) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PointStats:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(
            **{k: (tuple(v) if isinstance(v, list) else _from_json_float(v)) for k, v in d.items() if k in fields}
        )


def _json_float(v):
    """JSON has no inf/nan: write them as strings."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _from_json_float(v):
    return float(v) if v in ("inf", "-inf", "nan") else v


def _ordered(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round to `dtype` and map to integers in the order of the values (+0 and -0 both 0): sign-magnitude bits to
    two's complement, in the signed integer type of the same width."""
    ftype, itype, mag = ULP_DTYPES[dtype]
    bits = (x if x.dtype == ftype else x.astype(ftype)).view(itype)
    sign = bits >> (8 * bits.itemsize - 1)  # 0 or -1
    key = bits & itype(mag)
    np.bitwise_xor(key, sign, out=key)
    np.subtract(key, sign, out=key)  # -magnitude where the sign bit is set
    return key


def _max_distance(ka: np.ndarray, kb: np.ndarray) -> int:
    if ka.dtype == np.int64:  # float64 keys: the difference may not fit int64; exact below 2^53
        return int(np.abs(ka.astype(np.float64) - kb.astype(np.float64)).max())
    x = ka.astype(np.int64 if ka.dtype == np.int32 else np.int32)
    x -= kb
    return int(np.abs(x, out=x).max())


class _Accumulator:
    def __init__(self, row_shape: tuple[int, ...], ulp_dtype: str, logits: bool):
        self.row_shape, self.ulp_dtype, self.logits = row_shape, ulp_dtype, logits
        self.n = 0
        self.sum_abs = self.sum_d2 = self.sum_a2 = self.sum_b2 = self.sum_ab = 0.0
        self.max_abs, self.max_a, self.ulp = -1.0, 0.0, 0
        self.worst: tuple[int, int, float, float] | None = None  # (row, offset in row, a, b)
        self.nan_a = self.inf_a = self.nan_b = self.inf_b = 0
        self.kl_sum, self.kl_max, self.kl_worst, self.top1, self.top5, self.positions = 0.0, -1.0, None, 0, 0.0, 0
        self.one_hot = 0

    def merge(self, other: _Accumulator) -> _Accumulator:
        """Both accumulators' rows together (the earlier row wins ties, as in one pass)."""
        for f in (
            "n",
            "sum_abs",
            "sum_d2",
            "sum_a2",
            "sum_b2",
            "sum_ab",
            "nan_a",
            "inf_a",
            "nan_b",
            "inf_b",
            "kl_sum",
            "top1",
            "top5",
            "positions",
            "one_hot",
        ):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        self.max_a, self.ulp = max(self.max_a, other.max_a), max(self.ulp, other.ulp)
        if other.worst is not None and (other.max_abs, -other.worst[0]) > (self.max_abs, -(self.worst or (0,))[0]):
            self.max_abs, self.worst = other.max_abs, other.worst
        if other.kl_worst is not None and (other.kl_max, -other.kl_worst) > (self.kl_max, -(self.kl_worst or 0)):
            self.kl_max, self.kl_worst = other.kl_max, other.kl_worst
        return self

    def add(self, rows: np.ndarray, a: np.ndarray, b: np.ndarray, dist: np.ndarray | None = None) -> None:
        """rows int[R]: indices (into the list of compared rows) of a, b float[R, *row_shape]; dist bool[R]: the
        rows whose distribution statistics (logits) are wanted."""
        a, b = a.reshape(len(rows), -1), b.reshape(len(rows), -1)
        both = None
        if not (np.isfinite(a).all() and np.isfinite(b).all()):  # rare: count, then compare the finite pairs
            self.nan_a += int(np.isnan(a).sum())
            self.inf_a += int(np.isinf(a).sum())
            self.nan_b += int(np.isnan(b).sum())
            self.inf_b += int(np.isinf(b).sum())
            both = np.isfinite(a) & np.isfinite(b)
            a, b = np.where(both, a, 0), np.where(both, b, 0)
        self.n += a.size if both is None else int(both.sum())
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        d = b64 - a64
        af, bf, df = a64.ravel(), b64.ravel(), d.ravel()
        self.sum_d2 += float(np.vdot(df, df))
        self.sum_a2 += float(np.vdot(af, af))  # vdot: no BLAS threads
        self.sum_b2 += float(np.vdot(bf, bf))
        self.sum_ab += float(np.vdot(af, bf))
        ad = np.abs(d, out=d)
        self.sum_abs += float(ad.sum())
        self.max_a = max(self.max_a, float(np.abs(a).max(initial=0.0)))
        if ad.size:
            k = int(ad.argmax())
            if ad.flat[k] > self.max_abs:
                r, o = divmod(k, ad.shape[1])
                self.max_abs, self.worst = float(ad.flat[k]), (int(rows[r]), o, float(af[k]), float(bf[k]))
            self.ulp = max(self.ulp, _max_distance(_ordered(a, self.ulp_dtype), _ordered(b, self.ulp_dtype)))
        if self.logits and (dist is None or dist.any()):
            if dist is not None and not dist.all():
                rows, a, b, a64, b64 = rows[dist], a[dist], b[dist], a64[dist], b64[dist]
            self._add_logits(rows, a, b, a64, b64)

    def _add_logits(self, rows, a, b, a64, b64) -> None:
        """KL, one-hot positions and top-1 / top-5 of the float32 rows (`kl_rows`, `top_overlap`)."""
        kl, one_hot = kl_rows(a64, b64)
        self.kl_sum += float(kl.sum())
        self.one_hot += int(one_hot.sum())
        self.positions += len(kl)
        k = int(kl.argmax())
        if kl[k] > self.kl_max:
            self.kl_max, self.kl_worst = float(kl[k]), int(rows[k])
        self.top1 += int((a.argmax(-1) == b.argmax(-1)).sum())
        self.top5 += float(int(top_counts(a, b, 5).sum()) / min(5, a.shape[-1]))


def kl_rows(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(KL(softmax(a) || softmax(b)) per row, in nats; bool per row: both softmaxes one-hot, ONE_HOT_TAIL) of
    float[R, V] scores, in float64: KL = sum p (la - lb) - log sa + log sb with la = a - max a, sa = sum exp(la),
    p = exp(la) / sa; the top probability is 1 / sa, so the mass off it is (sa - 1) / sa."""
    a64, b64 = a.astype(np.float64, copy=False), b.astype(np.float64, copy=False)
    la = a64 - a64.max(-1, keepdims=True)
    lb = b64 - b64.max(-1, keepdims=True)
    ea = np.exp(la)
    sa, sb = ea.sum(-1), np.exp(lb).sum(-1)
    kl = np.einsum("rv,rv->r", ea, la - lb) / sa - np.log(sa) + np.log(sb)
    return kl, ((sa - 1) / sa < ONE_HOT_TAIL) & ((sb - 1) / sb < ONE_HOT_TAIL)


def top_counts(a: np.ndarray, b: np.ndarray, k: int = 5) -> np.ndarray:
    """int[R]: |topk(a) & topk(b)| per row of float[R, V] scores (k capped at V)."""
    ta, tb = _top(a, k), _top(b, k)
    return np.array([len(set(x) & set(y)) for x, y in zip(ta.tolist(), tb.tolist())], np.int64)


def _top(x: np.ndarray, k: int) -> np.ndarray:
    """int[R, k]: indices of each row's k largest values (k argmax passes: cheaper than a partition of V)."""
    x = x.copy()
    r = np.arange(len(x))
    out = []
    for _ in range(min(k, x.shape[1])):
        i = x.argmax(-1)
        out.append(i)
        x[r, i] = -np.inf
    return np.stack(out, -1)


def point_stats(
    a: np.ndarray,
    b: np.ndarray,
    ulp_dtype: str = "float32",
    valid: np.ndarray | None = None,
    logits: bool = False,
    dist_valid: np.ndarray | None = None,
) -> PointStats:
    """Statistics of b against a (same shape). `valid` bool[B, S] keeps the real positions of a point whose first
    two axes are [B, S] (padding positions are never compared); `logits` adds the per-position distribution
    statistics (last axis = vocabulary), over the positions of `dist_valid` (bool[B, S]; default every kept one)."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    shape = a.shape
    if a.ndim == 0:
        a, b = a.reshape(1), b.reshape(1)
    if valid is not None and a.ndim >= 2 and a.shape[:2] == valid.shape:
        keep = np.asarray(valid, bool)
    else:
        keep = np.ones(a.shape[: a.ndim - 1 if logits else 1], bool)
    row_shape = a.shape[keep.ndim :]
    flat_a, flat_b = a.reshape(-1, *row_shape), b.reshape(-1, *row_shape)
    index, lin = np.argwhere(keep), np.flatnonzero(keep)
    dist = None
    if logits and dist_valid is not None and keep.shape == np.shape(dist_valid):
        dist = np.asarray(dist_valid, bool)[keep]
    per_chunk = max(1, CHUNK_ELEMENTS // max(1, math.prod(row_shape)))
    starts = list(range(0, len(lin), per_chunk))
    workers = max(1, min(THREADS, len(starts)))

    def run(group: list[int]) -> _Accumulator:
        acc = _Accumulator(row_shape, ulp_dtype, logits)
        for start in group:
            sel = lin[start : start + per_chunk]
            acc.add(
                np.arange(start, start + len(sel)),
                flat_a[sel],
                flat_b[sel],
                None if dist is None else dist[start : start + per_chunk],
            )
        return acc

    groups = [starts[i::workers] for i in range(workers)]  # numpy releases the GIL: chunks run in parallel
    if workers == 1:
        parts = [run(groups[0])]
    else:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(run, groups))
    acc = functools.reduce(_Accumulator.merge, parts)
    return _finish(acc, shape, index, row_shape)


def _finish(acc: _Accumulator, shape, index, row_shape) -> PointStats:
    worst_index = worst_a = worst_b = None
    if acc.worst is not None:
        r, o, worst_a, worst_b = acc.worst
        worst_index = tuple(int(i) for i in index[r]) + tuple(int(i) for i in np.unravel_index(o, row_shape))
    na, nb = math.sqrt(acc.sum_a2), math.sqrt(acc.sum_b2)
    if acc.sum_d2 == 0:
        sqnr = math.inf
    elif acc.sum_a2 == 0:
        sqnr = -math.inf
    else:
        sqnr = 10 * math.log10(acc.sum_a2 / acc.sum_d2)
    max_abs = max(acc.max_abs, 0.0)
    extra = {}
    if acc.logits and acc.positions:
        extra = dict(
            kl_max=acc.kl_max,
            kl_mean=acc.kl_sum / acc.positions,
            kl_worst_position=tuple(int(i) for i in index[acc.kl_worst]),
            top1=acc.top1 / acc.positions,
            top5=acc.top5 / acc.positions,
            kl_degenerate=acc.one_hot / acc.positions,
        )
    return PointStats(
        shape=tuple(shape),
        compared=acc.n,
        max_abs=max_abs,
        mean_abs=acc.sum_abs / max(acc.n, 1),
        max_rel=_ratio(max_abs, acc.max_a),
        rms_rel=_ratio(math.sqrt(acc.sum_d2), na),
        cosine=(acc.sum_ab / (na * nb)) if na and nb else (1.0 if na == nb else 0.0),
        sqnr_db=sqnr,
        ulp=acc.ulp,
        ulp_dtype=acc.ulp_dtype,
        scale_ulp=scale_ulp(max_abs, acc.max_a, acc.ulp_dtype),
        worst_index=worst_index,
        worst_a=worst_a,
        worst_b=worst_b,
        nan_a=acc.nan_a,
        inf_a=acc.inf_a,
        nan_b=acc.nan_b,
        inf_b=acc.inf_b,
        **extra,
    )


def scale_ulp(max_abs: float, scale: float, dtype: str) -> float:
    """max_abs in units in the last place of `dtype` at magnitude `scale` (2^(e - mantissa bits) for scale in
    [2^e, 2^(e+1))): 0 when there is no error, inf when the scale is 0 but the error is not."""
    if max_abs == 0:
        return 0.0
    if not scale or not math.isfinite(scale):
        return math.inf
    return max_abs / math.ldexp(1.0, math.frexp(scale)[1] - 1 - MANTISSA_BITS[dtype])


def _ratio(x: float, ref: float) -> float:
    if x == 0:
        return 0.0
    return x / ref if ref else math.inf
