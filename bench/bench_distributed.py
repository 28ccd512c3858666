"""1 rank against N ranks of ``torchrun -m quantlab quantize`` on the same command, in one run.

    python bench/bench_distributed.py [--method gptq] [--calib-samples 128] [--ranks 2] [--repeats 2]

Both runs use one thread per process (torchrun's default, and what keeps GPTQ's Cholesky
bit-identical between them), the same calibration windows and the same evaluation cap. Printed:
the calibration seconds each run reports (``seconds`` of the JSON: quantization without
evaluation), the wall time of the whole command (imports, loading, evaluation on rank 0), their
ratios, and whether the exported codes and scales are bit-identical. Runs alternate and the best
of ``--repeats`` counts, so a busy machine penalises both alike. On one machine with C cores, N
ranks can gain at most min(N, C) over one single-threaded process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _command(ranks: int, args: argparse.Namespace, out: Path) -> list[str]:
    launcher = [sys.executable] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    return [*launcher, "-m", "quantlab", "quantize", "--method", args.method, "--group-size", "128",
            "--calib-samples", str(args.calib_samples), "--max-eval-tokens", str(args.max_eval_tokens),
            "--out", str(out), "--json"]


def _run(ranks: int, args: argparse.Namespace, out: Path) -> tuple[float, float, dict]:
    """(calibration seconds, wall seconds, the JSON document) of one command."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    done = subprocess.run(_command(ranks, args, out), cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{ranks} rank(s) failed:\n{done.stderr[-2000:]}")
    document = json.loads(done.stdout)
    return document["seconds"], wall, document


def _same_codes(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and x[k].equal(y[k]) for k in x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="gptq", choices=("rtn", "gptq", "awq", "smoothquant"))
    parser.add_argument("--calib-samples", type=int, default=128, help="calibration windows of 256 tokens")
    parser.add_argument("--max-eval-tokens", type=int, default=4096)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    best: dict[int, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for ranks in (1, args.ranks):
                calib, wall, document = _run(ranks, args, Path(tmp) / f"r{ranks}-{repeat}")
                old = best.get(ranks, (float("inf"), float("inf")))
                best[ranks] = (min(old[0], calib), min(old[1], wall))
                print(f"  run {repeat + 1}, {ranks} rank(s): calibration {calib:.1f} s, wall {wall:.1f} s, "
                      f"perplexity {document.get('perplexity', float('nan')):.4f}", flush=True)
        same = _same_codes(Path(tmp) / "r1-0", Path(tmp) / f"r{args.ranks}-0")
    (c1, w1), (cn, wn) = best[1], best[args.ranks]
    print(f"{args.method}, {args.calib_samples} x 256 calibration tokens, {os.cpu_count()} CPU cores, "
          f"best of {args.repeats}:")
    print(f"  calibration: 1 rank {c1:.1f} s, {args.ranks} ranks {cn:.1f} s, ratio {c1 / cn:.2f}x")
    print(f"  whole command: 1 rank {w1:.1f} s, {args.ranks} ranks {wn:.1f} s, ratio {w1 / wn:.2f}x")
    print(f"  codes and scales bit-identical: {same}")


if __name__ == "__main__":
    main()
