"""Wall time and peak memory of RTN, GPTQ and AWQ at INT4 g128, and the default sweep's total time.

Each method runs in its own subprocess, so that its peak resident memory is its own: the child
loads the model and the calibration tokens, resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``), quantizes (no evaluation) and reads the peak back (``VmHWM``). The
peak is reported above the RSS the process had *before the model was loaded*, so it counts the
full-precision model itself plus everything quantization adds, and as a ratio to the model's
FP32 size. "Calibration activations" is the hidden state of every calibration token at one block
boundary (N x L x hidden x 4 bytes), the runner's block inputs; the target is
peak <= 1.5 x FP32 model + those activations. Then the default sweep runs in one more subprocess.

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

    from quantlab.algorithms.base import parse_config_name
    from quantlab.models import load_model
    from quantlab.pipeline import QuantSession, quantize_model

    before_model = rss_bytes("VmRSS")
    loaded = load_model(source, device="cpu")
    config = parse_config_name(f"{method}-int4-g128")
    session = QuantSession(loaded)
    calib_ids = session.calibration_ids(config.calib)
    fp32_bytes = sum(p.numel() * 4 for p in {id(p): p for p in loaded.model.parameters()}.values())
    hidden = loaded.model.config.hidden_size
    activations = calib_ids.numel() * hidden * 4
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
        "peak_over_baseline": peak - before_model, "peak_over_loaded": peak - loaded_rss,
    }


def child_sweep(source: str | None) -> dict:
    """Runs in the subprocess: the default sweep, timed, with each configuration's own seconds."""
    from quantlab.models import load_model
    from quantlab.pipeline import run_sweep

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
    print(f"FP32 model {first['fp32_model_bytes'] / mib:.1f} MiB; calibration {first['calib_tokens']:,} tokens, "
          f"activations at a block boundary {first['activation_bytes'] / mib:.1f} MiB")
    print(f"{'method':<8} {'seconds':>8} {'x RTN':>6} {'peak-base MiB':>14} {'x FP32':>7} {'target MiB':>11} "
          f"{'ok':>3} {'peak-loaded MiB':>16}")
    rtn_seconds = next((r["seconds"] for r in rows if r["method"] == "rtn"), None)
    for r in rows:
        target = 1.5 * r["fp32_model_bytes"] + r["activation_bytes"]
        ratio = f"{r['seconds'] / rtn_seconds:6.2f}" if rtn_seconds else f"{'-':>6}"
        print(f"{r['method']:<8} {r['seconds']:8.2f} {ratio} {r['peak_over_baseline'] / mib:14.1f} "
              f"{r['peak_over_baseline'] / r['fp32_model_bytes']:7.2f} {target / mib:11.1f} "
              f"{'yes' if r['peak_over_baseline'] <= target else 'NO':>3} {r['peak_over_loaded'] / mib:16.1f}")
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
