"""Wall time and peak memory of RTN, GPTQ and AWQ at INT4 g128, and the default sweep's total time.

Each method runs in its own subprocess, so that its peak resident memory is its own: the child
loads the model and the calibration tokens, resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``), quantizes (no evaluation) and reads the peak back (``VmHWM``). The
peak is the FP32 model plus the RSS that quantizing added above the loaded state, also as a ratio
to the model's FP32 size. "Calibration activations" are the hidden states of every calibration token at a block's
input and output (2 x N x L x hidden x 4 bytes), which the runner holds at once as GPTQ's reference
does; the target is peak <= 1.5 x FP32 model + those activations. A tiny warm-up run precedes the
measured one, so lazy imports and first-call allocations are not counted. Then the default sweep
runs in one more subprocess.

    python bench/bench_algorithms.py [SOURCE] [--methods rtn,gptq,awq] [--no-sweep] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_bytes(field: str) -> int:
    """VmRSS / VmHWM of this process from /proc, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child_method(source: str | None, method: str) -> dict:
    """Runs in the subprocess: quantize once with ``method`` at INT4 g128, measuring time and memory."""
    import torch

    from quantlab.recipe import CalibConfig, parse_config_name
    from quantlab.models.loading import load_model
    from quantlab.runs.pipeline import QuantSession, quantize_model

    before_model = rss_bytes("VmRSS")
    loaded = load_model(source, device="cpu")
    config = parse_config_name(f"{method}-int4-g128")
    session = QuantSession(loaded)
    calib_ids = session.calibration_ids(config.calib)
    fp32_bytes = sum(p.numel() * 4 for p in {id(p): p for p in loaded.model.parameters()}.values())
    hidden = loaded.model.config.hidden_size
    activations = 2 * calib_ids.numel() * hidden * 4  # the runner holds a block's inputs and its outputs
    # A tiny warm-up run first: lazy imports and first-call allocations are not quantization's memory.
    warm_up = parse_config_name(f"{method}-int4-g128", calib=CalibConfig(n_samples=2, seq_len=32))
    quantize_model(loaded, warm_up, session=session, evaluate_quality=False)
    loaded_rss = rss_bytes("VmRSS")
    exact_peak = reset_peak()
    start = time.perf_counter()
    with torch.no_grad():
        _, result = quantize_model(loaded, config, session=session, evaluate_quality=False)
    seconds = time.perf_counter() - start
    peak = rss_bytes("VmHWM")
    return {
        "method": method, "config": result.config.name, "seconds": seconds, "fp32_model_bytes": fp32_bytes,
        "calib_tokens": calib_ids.numel(), "activation_bytes": activations,
        "rss_before_model": before_model, "rss_loaded": loaded_rss, "peak_rss": peak, "peak_reset": exact_peak,
        "peak_over_loaded": peak - loaded_rss,
    }


def child_sweep(source: str | None) -> dict:
    """Runs in the subprocess: the default sweep, timed, with each configuration's own seconds."""
    from quantlab.models.loading import load_model
    from quantlab.runs.pipeline import run_sweep

    loaded = load_model(source, device="cpu")
    start = time.perf_counter()
    results = run_sweep(loaded)
    total = time.perf_counter() - start
    return {"total_seconds": total, "runs": [
        {"config": r.config.name, "quantize_seconds": r.seconds, "perplexity": r.quality.get("perplexity"),
         "kl": r.quality.get("kl_divergence"), "bits": r.bits_per_weight} for r in results]}


def run_child(args: list[str], threads: int | None) -> dict:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report_methods(rows: list[dict]) -> None:
    mib = 2**20
    first = rows[0]
    print(f"FP32 model {first['fp32_model_bytes'] / mib:.1f} MiB; calibration {first['calib_tokens']:,} tokens; "
          f"activations (block inputs + outputs) {first['activation_bytes'] / mib:.1f} MiB")
    print(f"{'method':<8} {'seconds':>8} {'x RTN':>6} {'added MiB':>10} {'peak MiB':>9} {'peak/FP32':>10} "
          f"{'target MiB':>11} {'ok':>3}")
    rtn_seconds = next((r["seconds"] for r in rows if r["method"] == "rtn"), None)
    for r in rows:
        peak = r["fp32_model_bytes"] + r["peak_over_loaded"]  # the model itself plus what quantizing it added
        target = 1.5 * r["fp32_model_bytes"] + r["activation_bytes"]
        ratio = f"{r['seconds'] / rtn_seconds:6.2f}" if rtn_seconds else f"{'-':>6}"
        print(f"{r['method']:<8} {r['seconds']:8.2f} {ratio} {r['peak_over_loaded'] / mib:10.1f} {peak / mib:9.1f} "
              f"{peak / r['fp32_model_bytes']:10.2f} {target / mib:11.1f} {'yes' if peak <= target else 'NO':>3}")
    if not all(r["peak_reset"] for r in rows):
        print("note: the peak mark could not be reset; peaks include model loading")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", default=None)
    parser.add_argument("--methods", default="rtn,gptq,awq")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the children")
    parser.add_argument("--child", nargs="+", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        source = None if rest[0] == "-" else rest[0]
        print(json.dumps(child_sweep(source) if kind == "sweep" else child_method(source, rest[1])))
        return
    source = args.source or "-"
    rows = [run_child(["method", source, m], args.threads) for m in args.methods.split(",")]
    report_methods(rows)
    if not args.no_sweep:
        sweep = run_child(["sweep", source], args.threads)
        print(f"\ndefault sweep: {sweep['total_seconds']:.1f} s in total (target < 60 s)")
        for r in sweep["runs"]:
            ppl = f"{r['perplexity']:.3f}" if r["perplexity"] is not None else "-"
            print(f"  {r['config']:<36} quantize {r['quantize_seconds']:6.2f} s  bits {r['bits']:6.3f}  ppl {ppl}")
    print(f"\nload average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
