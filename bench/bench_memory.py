"""Resident memory over a long session: the default sweep run again and again in one process.

    python bench/bench_memory.py [--runs 20] [--device cpu] [--trim]

Loads the bundled LM once and runs ``run_sweep`` with the default configurations ``--runs`` times,
as a long workshop session does. Resident memory (RSS) is read after each run, once garbage is
collected. Run 1 fills the caches every later run shares (allocator pools, tokenizer, compiled
kernels), so growth is measured from run 2 to the last run: the target is a ratio within 10%.

RSS also counts memory the C allocator keeps for reuse after it was freed, which moves by tens of
MiB from run to run. Two measures separate that from a leak: the bytes of every tensor still alive
(a leak of tensors grows them), and with ``--trim`` the RSS after glibc's ``malloc_trim`` has handed
the free memory back. Also prints each run's seconds and that every run gave the same quality.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quantlab.device import trim_c_heap  # noqa: E402  (after the path set-up above)
from quantlab.models.loading import load_model  # noqa: E402
from quantlab.runs.pipeline import DEFAULT_SWEEP, run_sweep  # noqa: E402

TARGET_RATIO = 1.10


def rss_mib() -> float:
    gc.collect()
    return psutil.Process(os.getpid()).memory_info().rss / 2**20


def live_tensor_mib() -> float:
    """MiB of the storages of every tensor Python still holds (each storage once)."""
    storages = {}
    for obj in gc.get_objects():
        # Exact types: compiled kernels leave FakeTensors (subclasses) that have no memory behind them.
        if type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.device.type != "meta":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()) / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="sweeps to run (at least 2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--trim", action="store_true", help="malloc_trim before each reading (glibc)")
    args = parser.parse_args()
    if args.runs < 2:
        parser.error("--runs must be at least 2: growth is measured from run 2")
    loaded = load_model(None, device=args.device)
    print(f"default sweep: {len(DEFAULT_SWEEP)} configurations ({', '.join(DEFAULT_SWEEP)}) on {loaded.name}, "
          f"{args.device}; RSS after loading {rss_mib():.1f} MiB", flush=True)
    rss, tensors, first_quality = [], [], None
    for run in range(1, args.runs + 1):
        started = time.perf_counter()
        results = run_sweep(loaded)
        quality = [r.quality.get("perplexity", r.quality.get("fidelity")) for r in results]
        first_quality = first_quality or quality
        del results
        if args.trim and not trim_c_heap():
            parser.error("--trim needs glibc's malloc_trim")
        rss.append(rss_mib())
        tensors.append(live_tensor_mib())
        same = "same quality" if quality == first_quality else f"quality CHANGED: {quality}"
        print(f"run {run:2d}: {time.perf_counter() - started:6.1f} s, RSS {rss[-1]:8.1f} MiB, live tensors "
              f"{tensors[-1]:7.1f} MiB, {same}", flush=True)
    ratio = rss[-1] / rss[1]
    verdict = "within" if ratio <= TARGET_RATIO else "OVER"
    print(f"RSS{' (trimmed)' if args.trim else ''} after run 2: {rss[1]:.1f} MiB; after run {args.runs}: "
          f"{rss[-1]:.1f} MiB; ratio {ratio:.3f} ({verdict} the {TARGET_RATIO - 1:.0%} target); runs 2..{args.runs} "
          f"ranged {min(rss[1:]):.1f}..{max(rss[1:]):.1f} MiB; live tensors {tensors[1]:.1f} -> {tensors[-1]:.1f} MiB")
    return 0 if ratio <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
