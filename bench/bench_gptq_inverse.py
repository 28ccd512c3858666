"""GPTQ's H⁻¹ from the Cholesky factor: torch.cholesky_inverse against QuantLab's triangular solve, side by side.

    nice -n 10 python bench/bench_gptq_inverse.py [--sizes 896,2048,4864]

For each width n, a damped Hessian of correlated inputs; both ways of inverting it from its
Cholesky factor run in turn (interleaved, best of --repeats), timed in process CPU seconds (all
threads; steady under a loaded machine) and wall seconds; prints the ratio and the relative
difference of the two inverses.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantlab.algorithms.gptq import inverse_from_cholesky  # noqa: E402


def timed(function, L):
    cpu, wall = time.process_time(), time.perf_counter()
    result = function(L)
    return result, time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="896,2048,4864")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"{'n':>6} {'cholesky_inverse cpu s':>23} {'triangular cpu s':>17} {'cpu ratio':>9} {'wall ratio':>10} {'rel diff':>9}")
    for n in (int(s) for s in args.sizes.split(",")):
        generator = torch.Generator().manual_seed(n)
        X = torch.randn(2 * n, n, generator=generator) @ torch.randn(n, n, generator=generator) / n**0.5
        H = 2 * X.t() @ X / X.shape[0]
        L = torch.linalg.cholesky(H + 0.01 * torch.diag(H).mean() * torch.eye(n))
        best = {"lib": (float("inf"), float("inf")), "ours": (float("inf"), float("inf"))}
        for _ in range(args.repeats):
            a, cpu_a, wall_a = timed(torch.cholesky_inverse, L)
            b, cpu_b, wall_b = timed(inverse_from_cholesky, L)
            best["lib"] = min(best["lib"], (cpu_a, wall_a))
            best["ours"] = min(best["ours"], (cpu_b, wall_b))
        diff = ((a - b).abs().max() / a.abs().max()).item()
        (cpu_a, wall_a), (cpu_b, wall_b) = best["lib"], best["ours"]
        print(f"{n:>6} {cpu_a:>23.2f} {cpu_b:>17.2f} {cpu_a / cpu_b:>9.1f} {wall_a / wall_b:>10.1f} {diff:>9.1e}", flush=True)


if __name__ == "__main__":
    main()
