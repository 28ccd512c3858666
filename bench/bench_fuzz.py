"""The fuzzers of tests/test_fuzz.py with many more examples than CI runs.

    python bench/bench_fuzz.py [--scale 20] [--only NAME]

Each fuzzer (safetensors bytes and headers, format and configuration names, group sizes, ``size``
command lines, ``quantize`` options, evaluation settings) runs ``scale`` times its CI count of
examples. A crash is any exception other than a QuantLabError, or a broken property (a header that
disagrees with the data it describes, a name that does not parse back). Prints the cases run per
fuzzer, the time taken, and the crashes (none expected); exits 1 if there is one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the fuzzers import the tests' helpers (conftest)

from test_fuzz import CASES_RUN, FUZZERS, fuzz  # noqa: E402  (after the path set-up above)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=20, help="examples per fuzzer, as a multiple of CI's")
    parser.add_argument("--only", choices=list(FUZZERS), default=None, help="run one fuzzer")
    args = parser.parse_args()
    crashes = {}
    print(f"{'fuzzer':<22} {'CI cases':>9} {'cases run':>10} {'seconds':>8}  result")
    for name, (_, _, ci_examples) in FUZZERS.items():
        if args.only not in (None, name):
            continue
        started = time.perf_counter()
        try:
            fuzz(name, ci_examples * args.scale)()
            result = "no crash"
        except Exception as exc:  # noqa: BLE001  a crash is the finding this script reports
            crashes[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            result = "CRASH " + crashes[name]
        print(f"{name:<22} {ci_examples:>9} {CASES_RUN[name]:>10} {time.perf_counter() - started:>8.1f}  {result}",
              flush=True)
    total = sum(CASES_RUN.values())
    print(f"{total} cases run, {len(crashes)} fuzzer(s) crashed" + (": " + ", ".join(crashes) if crashes else ""))
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
