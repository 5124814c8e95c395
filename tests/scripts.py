"""Running the top-level scripts as a user does (a subprocess), for the end-to-end tests of the stages."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# one thread and MKL's reproducible mode: two processes then compute bit-identical floats whatever the
# memory alignment and thread timing, which the resume tests rely on (tiny models gain nothing from threads)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_CBWR": "COMPATIBLE"}
TIMINGS = ("time", "tok_per_s", "mfu")  # the only metrics that differ between two identical runs


def script(name, *args, check=True):
    """Run ROOT/name with args; with check, fail the test (showing stderr) unless it exits 0."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, name), *args], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def without_timings(rows):
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]
