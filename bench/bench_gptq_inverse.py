"""GPTQ's factor U (UᵀU = H⁻¹) three ways, side by side: the reference's three steps, the stop-19
route (a triangular solve in place of cholesky_inverse) and QuantLab's one factorisation.

    python bench/bench_gptq_inverse.py [--sizes 896,2048,4864] [--repeats 3]

For each width n (Qwen2.5-0.5B's 896 and 4864, a 2048 in between), a damped Hessian of correlated
inputs; the three routes run in turn (interleaved, best of --repeats) timed in wall and process CPU
seconds; prints each time, the ratio to the reference and U's largest difference from the
reference's, relative to its largest entry. Run it on an idle machine: the stop-19 claim that
cholesky_inverse was ~10x slower came from a machine at load 16-19 and did not hold on an idle one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantlab.algorithms.gptq import inverse_from_cholesky, upper_cholesky_of_inverse  # noqa: E402


def reference(H: torch.Tensor) -> torch.Tensor:
    """GPTQ's reference code and llm-compressor: Cholesky, cholesky_inverse, Cholesky (upper)."""
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


def triangular(H: torch.Tensor) -> torch.Tensor:
    return torch.linalg.cholesky(inverse_from_cholesky(torch.linalg.cholesky(H)), upper=True)


def quantlab(H: torch.Tensor) -> torch.Tensor:
    return upper_cholesky_of_inverse(H)[0]


ROUTES = {"reference": reference, "triangular": triangular, "quantlab": quantlab}


def timed(function, H):
    cpu, wall = time.process_time(), time.perf_counter()
    result = function(H)
    return result, (time.perf_counter() - wall, time.process_time() - cpu)


def hessian(n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(n)
    X = torch.randn(2 * n, n, generator=generator) @ torch.randn(n, n, generator=generator) / n**0.5
    H = 2 * X.t() @ X / X.shape[0]
    return H + 0.01 * torch.diag(H).mean() * torch.eye(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="896,2048,4864")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{'n':>6} " + " ".join(f"{name + ' wall s':>17}" for name in ROUTES)
          + f" {'ref/quantlab wall':>17} {'ref/quantlab cpu':>16} {'max rel diff':>12}")
    for n in (int(s) for s in args.sizes.split(",")):
        H = hessian(n)
        best, results = {name: (float("inf"), float("inf")) for name in ROUTES}, {}
        for _ in range(args.repeats):
            for name, route in ROUTES.items():
                results[name], seconds = timed(route, H)
                best[name] = min(best[name], seconds)
        scale = results["reference"].abs().max()
        diff = max(((results[name] - results["reference"]).abs().max() / scale).item() for name in ROUTES)
        ratio_wall = best["reference"][0] / best["quantlab"][0]
        ratio_cpu = best["reference"][1] / best["quantlab"][1]
        print(f"{n:>6} " + " ".join(f"{best[name][0]:>17.3f}" for name in ROUTES)
              + f" {ratio_wall:>17.2f} {ratio_cpu:>16.2f} {diff:>12.1e}", flush=True)


if __name__ == "__main__":
    main()
