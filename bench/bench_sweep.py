"""Wall time of the default sweep as a user runs it: ``python -m quantlab sweep``, start-up included.

    python bench/bench_sweep.py [--out FILE.json] [--repeat N]

Each repeat is a fresh interpreter (imports, model load, calibration, ten configurations, each
evaluated on 16,384 held-out tokens), timed from outside; the target is under 60 s. The command's
own record says how much of that the quantization itself took.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 60.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="keep the sweep record here (default: a temporary file)")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    for run in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(args.out) if args.out else Path(tmp) / "sweep.json"
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "quantlab", "sweep", "--out", str(out)], cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - start
            record = json.loads(out.read_text())
        quantization = record["timings"]["total_seconds"]
        print(f"run {run + 1}: default sweep {wall:.1f} s wall (target < {TARGET_SECONDS:.0f} s, "
              f"{wall / TARGET_SECONDS:.2f} of it); quantization {quantization:.1f} s, the rest start-up, "
              f"reference and evaluation of {len(record['runs'])} configurations")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
