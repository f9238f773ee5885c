"""`parity golden check` of a tiny shipped bundle: seconds after import, per implementation (issue 8 section 5:
under 2 s on CPU).

    python benchmarks/golden_check.py                      # every shipped bundle, torch and jax, 3 fresh processes each
    python benchmarks/golden_check.py --json

Each measurement is a fresh process (what a CI step or a user pays): the time to import the library and the
implementation, then the time of one `golden.check` (load, forward, 8 teacher-forced decode steps, comparison). jax
is measured twice: with an empty persistent compilation cache (every XLA compilation paid: the first check on a
machine) and with the cache the previous run filled (what the `parity` command gives every later check: it turns
the cache on, see parity.cli.jax_compile_cache_default). Figures are medians of --repeat processes; the ratio column
is against the 2 s target.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 2.0
CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from parity import golden
from parity.run import impl_api
impl_api(sys.argv[2])
t1 = time.perf_counter()
ok = bool(golden.check(sys.argv[1], impl=sys.argv[2]))
print(json.dumps({"import_s": t1 - t0, "check_s": time.perf_counter() - t1, "passed": ok}))
"""


def one(bundle: str, impl: str, cache: str | None) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "JAX_COMPILATION_CACHE_DIR": cache or "",
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    out = subprocess.run(
        [sys.executable, "-c", CHILD, bundle, impl], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(bundle: str, impl: str, mode: str, repeat: int) -> dict:
    runs = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(prefix="parity-xla-") as d:
            if mode == "warm cache":
                one(bundle, impl, d)  # fills the cache
            runs.append(one(bundle, impl, d if impl == "jax" else None))
    check = statistics.median(r["check_s"] for r in runs)
    return {
        "bundle": os.path.basename(bundle),
        "impl": impl,
        "mode": mode,
        "passed": all(r["passed"] for r in runs),
        "import_s": round(statistics.median(r["import_s"] for r in runs), 3),
        "check_s": round(check, 3),
        "vs_target": round(check / TARGET_S, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    bundles = sorted(str(p) for p in (ROOT / "golden").glob("*.bundle"))
    rows = []
    for b in bundles:
        rows.append(measure(b, "torch", "-", a.repeat))
        rows.append(measure(b, "jax", "empty cache", a.repeat))
        rows.append(measure(b, "jax", "warm cache", a.repeat))
        if not a.json:
            for r in rows[-3:]:
                print(
                    f"{r['bundle']:34s} {r['impl']:6s} {r['mode']:12s} import {r['import_s']:6.2f} s  check "
                    f"{r['check_s']:6.2f} s  {r['vs_target']:5.2f}x of {TARGET_S:.0f} s  "
                    f"{'pass' if r['passed'] else 'FAIL'}",
                    flush=True,
                )
    if a.json:
        print(json.dumps({"target_s": TARGET_S, "repeat": a.repeat, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
