"""Streaming / memory benchmark of the checkpoint converter (`converters.convert.convert`).

    python benchmarks/convert.py                      # full size: synthetic PaliGemma 2 3B-224 bf16 (~6 GB)
    python benchmarks/convert.py --small              # smoke run on tiny-pg2-gqa
    python benchmarks/convert.py --json               # machine-readable result on stdout
    python benchmarks/convert.py --legs st            # only npz <-> safetensors (--legs orbax: only the orbax legs)

What it does:
1. writes a synthetic checkpoint in the released Kaggle layout (`params/...` keys, bf16 members with the `<V2` npy
   descr that np.savez writes for bfloat16, which np.load reads back as void `|V2`), member by member through
   `converters.npz_write.NpzWriter`, each member generated in chunks (a layer, or a row block of the embedding) from a
   seeded numpy Generator, so nothing close to the whole checkpoint is ever in memory. `--weights realistic` (the
   default): per-leaf statistics like a release's (`parity.synthetic`: kernels ~ 1/sqrt(fan_in), norms near their
   init, ...) rounded to bf16; `--weights chaotic` (the stress case): random bits masked to finite bf16 values of
   magnitude 2^-7 .. 2;
2. measures, each in its own child process (peak RSS from os.wait4's rusage of that child alone), after dropping
   the page cache when allowed (root): (a) `cp` of the npz (the I/O floor), (b) npz -> safetensors, (c) `cp -r`
   of the safetensors directory, (d) safetensors -> npz; the orbax legs (e) npz -> orbax (floor: (a)), (f) `cp -r`
   of the orbax directory, (g) orbax -> safetensors and (h) orbax -> npz (floor: (f)); wall time of the command,
   and wall time including the `sync` that flushes what it wrote;
3. checks the round trips npz -> safetensors -> npz and npz -> orbax -> npz are bit-exact, streamed: sha256 of
   every member's data, layer by layer (row blocks for the embedding), in the original and the round-tripped npz.

Each conversion runs paired with its cp floor, alternately (floor, conversion, floor, conversion, ...; --repeat
pairs): this disk drifts by 2x within minutes, so a conversion is divided by the floor run just before it and the
ratio reported is the median of those paired ratios (also printed: fastest over fastest, and wall alone).
Targets: peak RSS <= 1.5 GB (10^9 bytes) per conversion; conversion wall <= 2 x the matching cp; npz <-> safetensors
peak RSS <= 0.5 GB and wall <= 1.3 x cp. Wall targets are judged on wall time including the sync, like for like:
a conversion fsyncs its output before renaming it into place (converters.atomic), so its own wall already includes
putting the bytes on disk, while a bare `cp` returns with them still in the page cache.
Everything it creates lives in --workdir (a fresh directory under /tmp by default) and is removed unless --keep.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import os
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import time
from statistics import median

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from parity.config import get_config  # noqa: E402  (stdlib only: the parent stays small, see _heavy)

np = dtypes = spec = synthetic = NpzReader = NpzWriter = None


def _heavy() -> None:
    """numpy and the converters, imported only in the child processes: a child's peak RSS (os.wait4) includes
    the RSS its parent had when it forked, so the parent keeps to the stdlib (~10 MB)."""
    global np, dtypes, spec, synthetic, NpzReader, NpzWriter
    import numpy as np

    from converters import dtypes
    from converters.npz_io import NpzReader
    from converters.npz_write import NpzWriter
    from parity import spec, synthetic


GB = 1e9
RSS_TARGET = 1.5 * GB
WALL_RATIO_TARGET = 2.0
ST_RSS_TARGET = 0.5 * GB  # npz <-> safetensors: a fixed budget at every model size
ST_WALL_TARGET = 1.3
# (conversion step, the cp step that is its floor)
LEGS = (
    ("npz_to_st", "cp_npz"),
    ("st_to_npz", "cp_st"),
    ("npz_to_orbax", "cp_npz"),
    ("orbax_to_st", "cp_orbax"),
    ("orbax_to_npz", "cp_orbax"),
)
ROW_BLOCK_BYTES = 64 << 20  # generation / hashing chunk for non-layered tensors
SMALL_VARIANT = "tiny-pg2-gqa"


# -- 1. synthetic checkpoint -----------------------------------------------------------------------------------
def random_bf16(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random finite bf16 values: random sign, mantissa and low 3 exponent bits over exponent 0x78 (2^-7 .. <2)."""
    n = int(np.prod(shape, dtype=np.int64))
    bits = np.frombuffer(rng.bytes(2 * n), dtype=np.uint16)
    bits = (bits & np.uint16(0x83FF)) | np.uint16(0x3C00)  # keep sign, exp bits 9..7, mantissa; exp in 120..127
    return bits.view(dtypes.BF16).reshape(shape)


def member_chunks(e: spec.Entry, rng: np.random.Generator, weights: str = "realistic"):
    """Consecutive C-order chunks of one canonical tensor: per layer, or row blocks, or whole."""
    piece = synthetic.piece_shape(e.key, e.shape, e.layers is not None)

    def chunk(shape):
        if weights == "chaotic":
            return random_bf16(rng, shape)
        return synthetic.draw(rng, e.key, shape, piece, "realistic", 1.0).astype(dtypes.BF16)

    if e.layers is not None:
        for _ in range(e.layers):
            yield chunk(e.shape[1:])
        return
    row_bytes = int(np.prod(e.shape[1:], dtype=np.int64)) * 2
    if len(e.shape) > 1 and e.shape[0] * row_bytes > ROW_BLOCK_BYTES:
        step = max(1, ROW_BLOCK_BYTES // row_bytes)
        for a in range(0, e.shape[0], step):
            yield chunk((min(e.shape[0], a + step) - a,) + e.shape[1:])
        return
    yield chunk(e.shape)


def generate(variant: str, path: str, seed: int, weights: str = "realistic") -> dict:
    cfg = get_config(variant)
    rng = np.random.default_rng(seed)
    ents = spec.entries(cfg)
    with open(path + ".partial", "wb") as f:
        w = NpzWriter(f)
        for e in ents:
            w.write(spec.NPZ_PREFIX + e.key, dtypes.BF16, e.shape, member_chunks(e, rng, weights))
        w.close()
    os.replace(path + ".partial", path)
    return {
        "members": len(ents),
        "bytes": os.path.getsize(path),
        "params": int(sum(int(np.prod(e.shape)) for e in ents)),
    }


# -- 3. streamed comparison ------------------------------------------------------------------------------------
def _bytes(x: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(x).reshape(-1).view(np.uint8))  # bf16 has no buffer format


def member_digests(path: str) -> dict[str, tuple[str, tuple, str, str]]:
    """key -> (dtype name, shape, npy header descr, sha256 of the data), read in layer / row-block chunks."""
    out = {}
    with NpzReader(path) as r:
        for key, m in r.members.items():
            h = hashlib.sha256()
            if len(m.shape) > 1 and m.nbytes > ROW_BLOCK_BYTES:
                row = m.nbytes // m.shape[0]
                step = max(1, ROW_BLOCK_BYTES // row)
                for a in range(0, m.shape[0], step):  # front to back: NpzReader also verifies each CRC-32
                    h.update(_bytes(r.read(key, rows=(a, min(m.shape[0], a + step)))))
            else:
                h.update(_bytes(r.read(key)))
            descr = re.search(rb"'descr': *'([^']*)'", m._header)
            out[key] = (dtypes.name(m.dtype), tuple(m.shape), descr.group(1).decode() if descr else "?", h.hexdigest())
    return out


def verify(a: str, b: str, variant: str) -> dict:
    da, db = member_digests(a), member_digests(b)
    expected = [spec.NPZ_PREFIX + e.key for e in spec.entries(get_config(variant))]
    problems = []
    if list(da) != expected:
        problems.append("original npz keys differ from the spec's (order or set)")
    if list(db) != list(da):
        problems.append(
            f"key order/set differs: only in original {sorted(set(da) - set(db))[:3]}, "
            f"only in round trip {sorted(set(db) - set(da))[:3]}"
        )
    for k in da:
        if k in db and da[k] != db[k]:
            what = ["dtype", "shape", "npy descr", "data sha256"]
            diff = [w for w, x, y in zip(what, da[k], db[k]) if x != y]
            problems.append(f"{k}: {', '.join(diff)} differ ({da[k][:3]} vs {db[k][:3]})")
    return {
        "bit_exact": not problems,
        "members": len(da),
        "problems": problems[:10],
        "descrs": sorted({v[2] for v in da.values()}),
    }


# -- 2. one conversion (child process) -----------------------------------------------------------------------------
def run_convert(src: str, dst: str, to: str, profile: str | None) -> dict:
    from converters.convert import convert

    per_key: dict[str, list] = {}  # tensor group -> [seconds, bytes]
    state = {"t": time.perf_counter(), "done": 0}

    def progress(done, total, key):
        now = time.perf_counter()
        g = re.sub(r"\.\d+\.", ".{i}.", key)
        s = per_key.setdefault(g, [0.0, 0])
        s[0] += now - state["t"]
        s[1] += done - state["done"]
        state["t"], state["done"] = now, done

    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    rep = convert(src, dst, to=to, progress=progress)
    if prof:
        prof.disable()
        prof.dump_stats(profile)
    slow = sorted(per_key.items(), key=lambda kv: -kv[1][0])[:8]
    return {
        "tensors": rep["tensors"],
        "bytes": rep["bytes"],
        "seconds": rep["seconds"],
        "notes": rep["notes"],
        "slowest": [
            {
                "tensor": k,
                "s": round(t, 3),
                "MB": round(n / 1e6, 1),
                "MB_per_s": round(n / 1e6 / t, 1) if t > 0 else None,
            }
            for k, (t, n) in slow
        ],
    }


def child_main(argv: list[str]) -> None:
    action, *args = argv
    _heavy()
    if action == "generate":
        res = generate(args[0], args[1], int(args[2]), args[3] if len(args) > 3 else "realistic")
    elif action == "convert":
        res = run_convert(args[0], args[1], args[2], args[3] if len(args) > 3 and args[3] else None)
    elif action == "verify":
        res = verify(args[0], args[1], args[2])
    else:
        raise SystemExit(f"unknown child action {action!r}")
    with open(os.environ["BENCH_RESULT"], "w") as f:
        json.dump(res, f)


# -- parent: measured steps ----------------------------------------------------------------------------------------
def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def page_cache_kb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1])
    return -1


def du(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(path) for n in ns)


def remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)
    side = path + ".parity.json"
    if os.path.exists(side):
        os.remove(side)


class Runner:
    def __init__(self, workdir: str, cold: bool, log, repeat: int = 1):
        self.workdir, self.cold, self.log, self.repeat = workdir, cold, log, repeat

    def measure(self, name: str, cmd: list[str], output: str | None) -> dict:
        """Run `cmd` as one child, `repeat` times (output removed in between, caches dropped before each when cold);
        the fastest run's (by wall time incl. sync) figures, every run's in `runs`."""
        if not self.cold and output is not None:  # no cache drop possible: warm once, measure the next runs
            self._run(cmd)
            remove(output)
        runs = []
        for k in range(self.repeat if output is not None else 1):
            if k and output is not None:
                remove(output)
            runs.append(self._timed(cmd))
        return self._summary(name, cmd, output, runs)

    def measure_pair(
        self, floor: tuple[str, list[str], str], leg: tuple[str, list[str], str]
    ) -> tuple[dict, dict, list[float]]:
        """A conversion and its `cp` floor run alternately, floor first, `repeat` times each (caches dropped before
        every run): the disk of these machines drifts by 2x within minutes (the same 6 GB cp took 5.7 to 21 s), so
        each conversion is divided by the floor run just before it. Returns both summaries and the paired ratios of
        wall time incl. sync; the leg's last output is kept (the next leg reads it)."""
        if not self.cold:
            for _, cmd, out in (floor, leg):
                self._run(cmd)
                remove(out)
        runs: dict[str, list[dict]] = {"floor": [], "leg": []}
        for _ in range(self.repeat):
            for which, (_, cmd, out) in (("floor", floor), ("leg", leg)):
                remove(out)
                runs[which].append(self._timed(cmd))
            remove(floor[2])
        ratios = [round(b["wall_sync_s"] / a["wall_sync_s"], 3) for a, b in zip(runs["floor"], runs["leg"])]
        f = self._summary(floor[0], floor[1], None, runs["floor"])
        g = self._summary(leg[0], leg[1], leg[2], runs["leg"])
        self.log(f"  {'':<24} paired ratios incl. sync {ratios}  median {median(ratios):.2f}")
        return f, g, ratios

    def _timed(self, cmd: list[str]) -> dict:
        cached_before = None
        os.sync()
        if self.cold:
            drop_caches()
            cached_before = page_cache_kb()
        r = self._run(cmd)
        t = time.perf_counter()
        os.sync()
        r["wall_sync_s"] = round(r["wall_s"] + time.perf_counter() - t, 3)
        r["page_cache_before_MB"] = round(cached_before / 1024) if cached_before is not None else None
        return r

    def _summary(self, name: str, cmd: list[str], output: str | None, runs: list[dict]) -> dict:
        r = dict(min(runs, key=lambda x: x["wall_sync_s"]))
        r["walls_s"] = [x["wall_s"] for x in runs]
        r["walls_sync_s"] = [x["wall_sync_s"] for x in runs]
        r["peak_rss_bytes"] = max(x["peak_rss_bytes"] for x in runs)
        r["name"] = name
        r["cmd"] = " ".join(cmd)
        if output is not None and os.path.exists(output):
            r["output_bytes"] = du(output)
        self.log(
            f"  {name:<24} wall {r['wall_s']:8.2f} s   +sync {r['wall_sync_s']:8.2f} s   "
            f"peak RSS {r['peak_rss_bytes'] / GB:6.3f} GB   runs +sync {r['walls_sync_s']}"
        )
        return r

    def _run(self, cmd: list[str]) -> dict:
        res_path = os.path.join(self.workdir, ".child_result.json")
        if os.path.exists(res_path):
            os.remove(res_path)
        env = dict(os.environ, BENCH_RESULT=res_path, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with open(os.path.join(self.workdir, ".child.log"), "w+b") as logf:
            t0 = time.perf_counter()
            p = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            _, status, ru = os.wait4(p.pid, 0)
            wall = time.perf_counter() - t0
            p.returncode = os.waitstatus_to_exitcode(status)
            if p.returncode != 0:
                logf.seek(0)
                raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{logf.read().decode()[-4000:]}")
        out = {
            "wall_s": round(wall, 3),
            "peak_rss_bytes": ru.ru_maxrss * 1024,
            "user_s": round(ru.ru_utime, 2),
            "sys_s": round(ru.ru_stime, 2),
        }
        if os.path.exists(res_path):
            with open(res_path) as f:
                out["result"] = json.load(f)
        return out


def child(action: str, *args: str) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "_child", action, *args]


def top_profile(path: str, n: int = 12) -> str:
    s = io.StringIO()
    pstats.Stats(path, stream=s).sort_stats("tottime").print_stats(n)
    text = s.getvalue()
    return text[text.find("   ncalls") :].rstrip()


def benchmark(args) -> dict:
    variant = SMALL_VARIANT if args.small else args.variant
    args.legs = set(args.legs.split(","))
    get_config(variant)
    made_workdir = args.workdir is None
    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="pg-convert-bench-", dir="/tmp"))
    os.makedirs(workdir, exist_ok=True)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else (lambda s: print(s, flush=True))
    cold = drop_caches() if not args.warm else False
    run = Runner(workdir, cold, log, args.repeat)
    src = os.path.join(workdir, f"{variant}.b16.npz")
    st_dir = os.path.join(workdir, f"{variant}.st")
    rt = os.path.join(workdir, f"{variant}.roundtrip.b16.npz")
    cp_npz, cp_st = os.path.join(workdir, "cp.npz"), os.path.join(workdir, "cp.st")
    ob_dir, cp_ob = os.path.join(workdir, f"{variant}.orbax"), os.path.join(workdir, "cp.orbax")
    ob_st, ob_rt = os.path.join(workdir, f"{variant}.orbax.st"), os.path.join(workdir, f"{variant}.orbax.rt.b16.npz")
    outputs = (st_dir, rt, cp_npz, cp_st, ob_dir, cp_ob, ob_st, ob_rt)
    stamp = src + ".bench.json"
    out: dict = {
        "variant": variant,
        "seed": args.seed,
        "weights": args.weights,
        "workdir": workdir,
        "cache": "cold" if cold else "warm",
        "cpus": os.cpu_count(),
        "steps": {},
    }
    log(
        f"convert benchmark: {variant}, seed {args.seed}, {args.weights} weights, workdir {workdir}, "
        f"{'cold cache (drop_caches before each step)' if cold else 'warm cache (each step run twice, 2nd timed)'}"
    )
    try:
        for p in outputs:
            remove(p)
        reuse = False
        if args.reuse and os.path.exists(src) and os.path.exists(stamp):
            with open(stamp) as f:
                reuse = json.load(f) == {"variant": variant, "seed": args.seed, "weights": args.weights}
        if reuse:
            log(f"  reusing {src}")
        else:
            remove(src)
            g = Runner(workdir, cold, log).measure(
                "generate npz", child("generate", variant, src, str(args.seed), args.weights), None
            )
            out["steps"]["generate"] = g
            with open(stamp, "w") as f:
                json.dump({"variant": variant, "seed": args.seed, "weights": args.weights}, f)
        out["npz_bytes"] = os.path.getsize(src)
        steps = out["steps"]
        cp_a = ("(a) cp npz", ["cp", src, cp_npz], cp_npz)
        paired = out["paired_ratios"] = {}
        if "st" in args.legs:
            steps["cp_npz"], steps["npz_to_st"], paired["npz_to_st"] = run.measure_pair(
                cp_a, ("(b) convert npz->st", child("convert", src, st_dir, "safetensors"), st_dir)
            )
            steps["cp_st"], steps["st_to_npz"], paired["st_to_npz"] = run.measure_pair(
                ("(c) cp -r safetensors", ["cp", "-r", st_dir, cp_st], cp_st),
                ("(d) convert st->npz", child("convert", st_dir, rt, "npz"), rt),
            )
            steps["verify"] = Runner(workdir, False, log).measure(
                "verify (sha256 both)", child("verify", src, rt, variant), None
            )
            if args.profile:
                for name, a, b, to in (
                    ("npz_to_st", src, st_dir + ".prof", "safetensors"),
                    ("st_to_npz", st_dir, rt + ".prof", "npz"),
                ):
                    pf = os.path.join(workdir, f"{name}.pstats")
                    r = run.measure(f"profiled {name}", child("convert", a, b, to, pf), b)
                    remove(b)
                    out.setdefault("profile", {})[name] = {"wall_s": r["wall_s"], "top_tottime": top_profile(pf)}
            remove(rt)  # disk: the 10B files are 19 GB each
            remove(st_dir)
        if "orbax" in args.legs:
            cp_npz_step, steps["npz_to_orbax"], paired["npz_to_orbax"] = run.measure_pair(
                cp_a, ("(e) convert npz->orbax", child("convert", src, ob_dir, "orbax"), ob_dir)
            )
            steps.setdefault("cp_npz", cp_npz_step)
            cp_f = ("(f) cp -r orbax", ["cp", "-r", ob_dir, cp_ob], cp_ob)
            steps["cp_orbax"], steps["orbax_to_st"], paired["orbax_to_st"] = run.measure_pair(
                cp_f, ("(g) convert orbax->st", child("convert", ob_dir, ob_st, "safetensors"), ob_st)
            )
            remove(ob_st)
            _, steps["orbax_to_npz"], paired["orbax_to_npz"] = run.measure_pair(
                cp_f, ("(h) convert orbax->npz", child("convert", ob_dir, ob_rt, "npz"), ob_rt)
            )
            steps["verify_orbax"] = Runner(workdir, False, log).measure(
                "verify orbax round trip", child("verify", src, ob_rt, variant), None
            )
    finally:
        if not args.keep:
            for p in (src, stamp, st_dir + ".prof", rt + ".prof") + outputs:
                remove(p)
            for n in (".child_result.json", ".child.log", "npz_to_st.pstats", "st_to_npz.pstats"):
                remove(os.path.join(workdir, n))
            if made_workdir:
                shutil.rmtree(workdir, ignore_errors=True)
    s = out["steps"]
    out["ratios"], out["ratios_incl_sync"], out["ratios_fastest_incl_sync"], rss = {}, {}, {}, {}
    for leg, floor in LEGS:
        if leg in s:
            out["ratios"][leg] = round(s[leg]["wall_s"] / s[floor]["wall_s"], 2)  # fastest over fastest
            out["ratios_fastest_incl_sync"][leg] = round(s[leg]["wall_sync_s"] / s[floor]["wall_sync_s"], 2)
            out["ratios_incl_sync"][leg] = round(median(out["paired_ratios"][leg]), 2)
            rss[leg] = s[leg]["peak_rss_bytes"]
    out["round_trip_bit_exact"] = all(s[v]["result"]["bit_exact"] for v in ("verify", "verify_orbax") if v in s)
    st_legs = [leg for leg in ("npz_to_st", "st_to_npz") if leg in rss]
    out["targets"] = {
        "peak_rss_le_1.5GB": max(rss.values()) <= RSS_TARGET,
        "wall_le_2x_cp": max(out["ratios_incl_sync"].values()) <= WALL_RATIO_TARGET,
        "npz_st_peak_rss_le_0.5GB": max((rss[leg] for leg in st_legs), default=0) <= ST_RSS_TARGET,
        "npz_st_wall_le_1.3x_cp": max((out["ratios_incl_sync"][leg] for leg in st_legs), default=0) <= ST_WALL_TARGET,
    }
    return out


def render(out: dict) -> str:
    s = out["steps"]
    lines = [
        f"variant {out['variant']}  npz {out['npz_bytes'] / GB:.3f} GB  cache {out['cache']}  cpus {out['cpus']}",
        "",
        f"{'step':<28}{'wall s':>9}{'+sync s':>9}{'GB/s':>7}{'peak RSS GB':>13}{'user s':>8}{'sys s':>7}",
    ]
    for key, label in (
        ("generate", "generate (synthetic)"),
        ("cp_npz", "(a) cp npz"),
        ("npz_to_st", "(b) convert npz -> st"),
        ("cp_st", "(c) cp -r st dir"),
        ("st_to_npz", "(d) convert st -> npz"),
        ("verify", "verify (sha256 x2)"),
        ("npz_to_orbax", "(e) convert npz -> orbax"),
        ("cp_orbax", "(f) cp -r orbax dir"),
        ("orbax_to_st", "(g) convert orbax -> st"),
        ("orbax_to_npz", "(h) convert orbax -> npz"),
        ("verify_orbax", "verify orbax (sha256 x2)"),
    ):
        if key not in s:
            continue
        r = s[key]
        gbs = out["npz_bytes"] / GB / r["wall_s"] if r["wall_s"] else 0
        lines.append(
            f"{label:<28}{r['wall_s']:>9.2f}{r['wall_sync_s']:>9.2f}{gbs:>7.2f}"
            f"{r['peak_rss_bytes'] / GB:>13.3f}{r['user_s']:>8.1f}{r['sys_s']:>7.1f}"
        )
    lines.append("")
    for leg, floor in LEGS:
        if leg in out["ratios"]:
            q = out["paired_ratios"][leg]
            lines.append(
                f"{leg:<14} / {floor:<9}: {out['ratios_incl_sync'][leg]:.2f}x incl. sync, median of "
                f"{len(q)} pairs [{min(q):.2f}-{max(q):.2f}]  "
                f"(fastest/fastest {out['ratios_fastest_incl_sync'][leg]:.2f}x, "
                f"wall alone {out['ratios'][leg]:.2f}x)   peak RSS {s[leg]['peak_rss_bytes'] / GB:.3f} GB"
            )
    for name, ok in out["targets"].items():
        lines.append(
            f"target {name:<26}: {'met' if ok else 'MISSED'}"
            + ("  (incl. sync: both outputs on disk)" if "wall" in name else "")
        )
    lines.append(f"round trips bit-exact: {'yes' if out['round_trip_bit_exact'] else 'no'}")
    for v in ("verify", "verify_orbax"):
        if v in s:
            res = s[v]["result"]
            lines.append(f"  {v}: {res['members']} members, npy descr {res['descrs']}")
            lines += [f"  ! {p}" for p in res["problems"]]
    for key, _ in LEGS:
        if key in s:
            lines += ["", f"slowest tensors, {key} (time attributed between progress calls):"]
            for x in s[key]["result"]["slowest"]:
                lines.append(f"  {x['s']:7.2f} s {x['MB']:9.1f} MB {x['MB_per_s'] or 0:8.1f} MB/s  {x['tensor']}")
    for key, p in out.get("profile", {}).items():
        lines += [
            "",
            f"cProfile {key} (wall {p['wall_s']:.1f} s under the profiler), top by tottime:",
            p["top_tottime"],
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        child_main(argv[1:])
        return 0
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--variant", default="paligemma2-3b-224", help="config of the synthetic checkpoint")
    ap.add_argument("--small", action="store_true", help=f"quick smoke run on {SMALL_VARIANT}")
    ap.add_argument("--workdir", help="where files go (default: a fresh directory under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the generated and converted files")
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="reuse a checkpoint generated earlier in --workdir (same variant and seed; needs --keep on that run)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--weights",
        choices=("realistic", "chaotic"),
        default="realistic",
        help="realistic: per-leaf statistics like a release's (parity.synthetic); chaotic: bf16 values 2^-7 .. 2",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="pairs (cp floor, conversion) run alternately per leg; the median paired ratio counts",
    )
    ap.add_argument("--warm", action="store_true", help="do not drop the page cache (run each step twice)")
    ap.add_argument("--profile", action="store_true", help="also run each conversion under cProfile")
    ap.add_argument("--legs", default="st,orbax", help="comma-separated: st (npz <-> safetensors), orbax")
    ap.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    args = ap.parse_args(argv)
    out = benchmark(args)
    print(json.dumps(out, indent=2) if args.json else "\n" + render(out))
    return 0 if out["round_trip_bit_exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
