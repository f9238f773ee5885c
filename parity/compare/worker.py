"""One side of a comparison in its own process: `python -m parity.compare.worker` reads a parity.job.Job (JSON) on
stdin, runs it (parity.pipeline.record_run), and prints one JSON line: {"capture", "teacher"} or {"error", "class"}."""

from __future__ import annotations

import json
import sys

from parity.compare.sides import run_job
from parity.errors import ParityError
from parity.job import Job


def main() -> int:
    job = Job.from_json(sys.stdin.read())
    try:
        reply = run_job(job)
    except ParityError as e:
        print(json.dumps({"error": str(e), "class": type(e).__name__}))
        return 2
    print(json.dumps(reply))
    return 0


if __name__ == "__main__":
    sys.exit(main())
