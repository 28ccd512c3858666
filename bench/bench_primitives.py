"""Time to fake-quantize a 4096x4096 fp32 weight, as a ratio to a plain copy of it.

The copy (``w.clone()``) is the memory-bandwidth floor: fake-quantizing must read the weight and
write a new one, as the copy does, plus one read for the min-max reduction. Every format is run
eagerly and through the fused (torch.compile'd) kernels; all timings are taken interleaved in
one run (each repeat times the copy and then every case), so that load from other processes
hits them alike. Each ratio is the median over repeats against the median copy, after a warm-up
call (which also compiles the fused kernels; its time is shown as "first call"); next to it, in
brackets, the best time against the best copy, which bursts of load from other processes affect
least.

    python bench/bench_primitives.py [--size 4096] [--repeats 9] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantlab.numerics import kernels  # noqa: E402
from quantlab.numerics.formats import QuantFormat  # noqa: E402
from quantlab.numerics.primitives import fake_quantize  # noqa: E402

FORMATS = ("int8", "int4-g128", "int4-g128-asym", "int4-g64", "int4-g64-asym", "nf4-g64", "fp8-e4m3")
MODES = ("never", "always")  # kernels.set_fused_mode values: eager, fused
MODE_LABEL = {"never": "eager", "always": "fused"}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def case_fn(w: torch.Tensor, fmt: QuantFormat, mode: str):
    def run() -> torch.Tensor:
        kernels.set_fused_mode(mode)
        return fake_quantize(w, fmt)

    return run


def warm_up(w: torch.Tensor, cases: dict) -> dict:
    """First call of every case (compiles the fused kernels) and whether fused equals eager."""
    first, identical, outputs = {}, {}, {}
    for (name, mode), fn in cases.items():
        start = time.perf_counter()
        outputs[name, mode] = fn()
        first[name, mode] = time.perf_counter() - start
    for name in {name for name, _ in cases}:
        identical[name] = torch.equal(outputs[name, "never"], outputs[name, "always"])
    return {"first": first, "identical": identical}


def measure(w: torch.Tensor, cases: dict, repeats: int) -> tuple[list[float], dict]:
    copy_times, times = [], {key: [] for key in cases}
    for _ in range(repeats):
        copy_times.append(timed(w.clone))
        for key, fn in cases.items():
            times[key].append(timed(fn))
    return copy_times, times


def ratio_text(times: list[float], copy_times: list[float]) -> str:
    median = statistics.median(times) / statistics.median(copy_times)
    return f"{median:.2f} ({min(times) / min(copy_times):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    w = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0))
    cases = {(name, mode): case_fn(w, QuantFormat.parse(name), mode) for name in FORMATS for mode in MODES}
    previous_mode = kernels.fused_mode()
    try:
        warm = warm_up(w, cases)
        copy_times, times = measure(w, cases, args.repeats)
    finally:
        kernels.set_fused_mode(previous_mode)
    print(f"fake_quantize of a {args.size}x{args.size} fp32 weight, {torch.get_num_threads()} thread(s), "
          f"{args.repeats} repeats; copy (w.clone()) = {statistics.median(copy_times) * 1e3:.1f} ms median, "
          f"{min(copy_times) * 1e3:.1f} ms best")
    print(f"{'format':<16}{'eager ms':>10}{'x copy (best)':>16}{'fused ms':>10}{'x copy (best)':>16}"
          f"{'first call s':>14}  fused == eager")
    for name in FORMATS:
        eager, fused = times[name, "never"], times[name, "always"]
        print(f"{name:<16}{statistics.median(eager) * 1e3:>10.1f}{ratio_text(eager, copy_times):>16}"
              f"{statistics.median(fused) * 1e3:>10.1f}{ratio_text(fused, copy_times):>16}"
              f"{warm['first'][name, 'always']:>14.1f}  {warm['identical'][name]}")


if __name__ == "__main__":
    main()
