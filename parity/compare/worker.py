"""One side of a comparison in its own process: `python -m parity.compare.worker` reads a job (JSON) on stdin,
writes the capture file(s) it names, and prints one JSON line: {"capture", "teacher"} or {"error", "class"}."""

from __future__ import annotations

import json
import sys

from parity.compare.sides import run_job
from parity.errors import ParityError


def main() -> int:
    j = json.loads(sys.stdin.read())
    try:
        if j.get("generate"):  # parity compare --generate: a generation file
            from parity.compare.generation import run_generation_job

            reply = run_generation_job(j)
        else:
            reply = run_job(j)
    except ParityError as e:
        print(json.dumps({"error": str(e), "class": type(e).__name__}))
        return 2
    print(json.dumps(reply))
    return 0


if __name__ == "__main__":
    sys.exit(main())
