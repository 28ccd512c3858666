"""Sequential onloading at real sizes: ``quantize --sequential`` of a bench shape, peak RSS against its checkpoint.

Builds the shape as bench_scale.py does (``bench/.scale/NAME``, seeded random bf16, sharded), then
runs, each as its own measured process (``os.wait4``: peak RSS of that process alone):

    quantize --sequential  rtn and/or gptq, int4 g128, into bench/.scale/NAME-METHOD-int4-g128
    inspect EXPORT         the export opens again (headers, quantization config)
    eval --sequential      with --eval-tokens N: the bf16 checkpoint itself and each export, one
                           block at a time (an export dequantizes block by block from its codes)

The runs' stderr goes to ``bench/results/sequential-NAME-METHOD.log`` as they run: one line per
block with its seconds, RSS and peak RSS. A stopped run resumes at its next block when this script
(or the same quantize command) runs again. Blocks compute in ``--dtype`` (default fp32: on CPUs
without bf16 instructions a bf16 matmul is several times slower than fp32's).

    nice -n 5 python bench/bench_sequential.py --shape llama-3-8b --methods rtn,gptq
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_scale  # noqa: E402  (the shape builder and the measured-process runner)

RESULTS = ROOT / "bench" / "results"


def quantize_argv(folder: Path, method: str, out: Path, samples: int, length: int, dtype: str) -> list[str]:
    return [sys.executable, "-m", "quantlab", "quantize", str(folder), "--method", method, "--group-size", "128",
            "--calib-samples", str(samples), "--calib-len", str(length), "--calib-batch", str(samples),
            "--dtype", dtype, "--sequential", "--out", str(out), "--json"]


def block_seconds(log_text: str) -> list[float]:
    return [float(s) for s in re.findall(r"block \d+ of \d+: ([0-9.]+) s, RSS", log_text)]


def row(label: str, result: dict, ckpt: int, blocks: list[float]) -> str:
    per_block = f"{statistics.mean(blocks):8.1f}" if blocks else f"{'-':>8}"
    status = "" if result["rc"] == 0 else f"  (exit {result['rc']})"
    return (f"{label:<42} {result['wall_s']:9.1f} {per_block} {result['peak_rss'] / 2**30:9.2f} "
            f"{result['peak_rss'] / ckpt:8.3f}{status}")


def run_method(folder: Path, shape: str, method: str, args, ckpt: int) -> dict:
    out = bench_scale.BUILD / f"{shape}-{method}-int4-g128"
    samples = args.rtn_samples if method == "rtn" else args.gptq_samples
    log_path = RESULTS / f"sequential-{shape}-{method}.log"
    if (out / "model.safetensors.index.json").is_file():
        print(f"{shape} {method}: {out} is already complete; delete it to measure again", flush=True)
        return {"method": method, "skipped": True}
    argv = quantize_argv(folder, method, out, samples, args.calib_len, args.dtype)
    if log_path.exists():  # a resumed run: keep the stopped one's per-block lines beside the new log
        parts = len(list(RESULTS.glob(f"{log_path.stem}-part*.log")))
        log_path.rename(log_path.with_name(f"{log_path.stem}-part{parts + 1}.log"))
    result = bench_scale.measured(argv, log_path)
    blocks = block_seconds(result["stderr"])
    print(row(f"quantize --sequential {method} ({samples}x{args.calib_len})", result, ckpt, blocks), flush=True)
    record = {"method": method, "calib": [samples, args.calib_len], "dtype": args.dtype, "checkpoint_bytes": ckpt,
              "wall_s": result["wall_s"], "peak_rss": result["peak_rss"], "rc": result["rc"], "block_s": blocks}
    if result["rc"] == 0:
        opened = bench_scale.measured([sys.executable, "-m", "quantlab", "inspect", str(out)],
                                      RESULTS / f"sequential-{shape}-{method}-inspect.log", keep_stdout=True)
        print(row("  inspect EXPORT", opened, ckpt, []), flush=True)
        record["inspect"] = {k: opened[k] for k in ("wall_s", "peak_rss", "rc")}
        if args.eval_tokens:
            record["eval"] = evaluate(out, f"{shape}-{method}", "  eval --sequential EXPORT", args, ckpt)
    return record


def evaluate(folder: Path, tag: str, label: str, args, ckpt: int) -> dict:
    """``eval FOLDER --sequential`` on the first --eval-tokens held-out tokens: time, peak RSS, perplexity."""
    argv = [sys.executable, "-m", "quantlab", "eval", str(folder), "--sequential", "--max-tokens",
            str(args.eval_tokens), "--dtype", args.dtype, "--json"]
    log_path = RESULTS / f"sequential-{tag}-eval.log"
    scored = bench_scale.measured(argv, log_path, keep_stdout=True)
    blocks = block_seconds(scored["stderr"])
    print(row(f"{label} ({args.eval_tokens} tokens)", scored, ckpt, blocks), flush=True)
    found = re.search(r'"perplexity": ([0-9.eE+-]+|Infinity)', scored["stderr"])  # the log holds stdout too
    return {k: scored[k] for k in ("wall_s", "peak_rss", "rc")} | {
        "tokens": args.eval_tokens, "block_s": blocks, "perplexity": float(found[1]) if found else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3-8b", help="a name in bench/shapes")
    parser.add_argument("--methods", default="rtn,gptq")
    parser.add_argument("--rtn-samples", type=int, default=2, help="RTN uses its windows only to measure errors")
    parser.add_argument("--gptq-samples", type=int, default=8)
    parser.add_argument("--calib-len", type=int, default=256)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--eval-tokens", type=int, default=0,
                        help="also evaluate the checkpoint and each export on N tokens, --sequential (0: no)")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    folder = bench_scale.in_child("build_shape", args.shape)
    ckpt = bench_scale.checkpoint_bytes(folder)
    print(f"# {args.shape}: {ckpt / 2**30:.2f} GiB bf16 checkpoint", flush=True)
    print(f"{'command':<42} {'wall s':>9} {'s/block':>8} {'peak GiB':>9} {'RSS/ckpt':>8}", flush=True)
    if args.eval_tokens:
        print(f"{'':<42} perplexity of the random-weight checkpoint: only time and memory mean anything", flush=True)
        scored = evaluate(folder, f"{args.shape}-bf16", "eval --sequential CHECKPOINT", args, ckpt)
        records = [{"method": "eval-checkpoint", "checkpoint_bytes": ckpt, "eval": scored}]
    else:
        records = []
    records += [run_method(folder, args.shape, m.strip(), args, ckpt) for m in args.methods.split(",") if m.strip()]
    summary = RESULTS / f"sequential-{args.shape}.json"
    kept = json.loads(summary.read_text()) if summary.is_file() else []  # other methods' earlier records stay
    measured_now = {r["method"] for r in records if not r.get("skipped")}
    records = [r for r in kept if r["method"] not in measured_now] + [r for r in records if not r.get("skipped")]
    summary.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
