"""QuantLab against llm-compressor: the same calibration windows, the same checkpoint format, one scorer.

    python bench/bench_peers.py --peer-python /path/to/peer-venv/bin/python [--cases rtn-int4-g128,...]

1. QuantLab draws its calibration windows (128 x 256 tokens of the bundled training text, seed 0)
   and saves them to ``WORK/calibration_windows.safetensors``; llm-compressor is fed exactly those
   windows (``num_calibration_samples=N, max_seq_length=T``), and QuantLab checks it drew the same.
2. Each case is quantized by QuantLab (its defaults for the method) and exported as a
   compressed-tensors ``pack-quantized`` checkpoint, and by llm-compressor (its defaults for the
   method, ``bench/peer_llmcompressor.py``, run by the peer's own Python: it pins other transformers
   / compressed-tensors versions than QuantLab). Quantization wall time is each tool's own.
3. One loop scores every checkpoint: compressed-tensors' own decompression gives the weights, they
   go into a copy of the full-precision model, and QuantLab's evaluator computes perplexity on the
   same held-out tokens (16,384 tokens in windows of 256), the full-precision model included.

Results are kept per case and tool in ``WORK/results.json`` (a rerun skips what is already done;
``--fresh`` starts over). ``--quantlab-scale-dtype fp32`` reruns QuantLab's side with the scale dtype
llm-compressor keeps (the weight's), to see how much of a difference the fp16 scales make. Without ``--peer-python`` the peer column is skipped, with a line saying so.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from quantlab.calibrate.runner import calibration_set  # noqa: E402
from quantlab.evaluation import EvalConfig, load_text  # noqa: E402
from quantlab.evaluation.perplexity import perplexity  # noqa: E402
from quantlab.models.loading import load_model  # noqa: E402
from quantlab.recipe import CalibConfig, parse_config_name  # noqa: E402
from quantlab.runs.export import export_compressed  # noqa: E402
from quantlab.runs.pipeline import QuantSession, quantize_model  # noqa: E402

# (QuantLab configuration, llm-compressor method, llm-compressor scheme)
CASES = {
    "rtn-int4-g128": ("rtn", "W4A16"),
    "rtn-int4-g128-asym": ("rtn", "W4A16_ASYM"),
    "gptq-int4-g128": ("gptq", "W4A16"),
    "gptq-int4-g128-asym": ("gptq", "W4A16_ASYM"),
    "awq-int4-g128": ("awq", "W4A16"),
    "awq-int4-g128-asym": ("awq", "W4A16_ASYM"),
    "rtn-int8": ("rtn", "W8A16"),
    "gptq-int8": ("gptq", "W8A16"),
    "rtn-int3-g128": ("rtn", "W3A16_G128"),
    "gptq-int3-g128": ("gptq", "W3A16_G128"),
}
MODEL_DIR = ROOT / "assets" / "models" / "pystdlib-llama-4m"
EVAL = EvalConfig(ctx=256, max_tokens=16_384)


def save_windows(loaded, calib: CalibConfig, path: Path) -> torch.Tensor:
    from safetensors.torch import save_file

    ids = calibration_set(loaded.tokenizer, calib)  # (N, T), what quantize_model draws for this calib
    save_file({"input_ids": ids.contiguous()}, str(path))
    return ids


def quantlab_case(loaded, session: QuantSession, name: str, calib: CalibConfig, out: Path,
                  scale_dtype: str | None = None) -> float:
    """QuantLab's run of ``name`` exported to ``out``; returns its quantization wall time."""
    config = parse_config_name(name, calib=calib)
    if scale_dtype:  # the diagnostic: the peer's scale dtype instead of QuantLab's fp16 default
        config = replace(config, weight_format=replace(config.weight_format, scale_dtype=scale_dtype))
    model, result = quantize_model(loaded, config, session=session, evaluate_quality=False)
    export_compressed(model, out)
    return result.seconds


def peer_case(peer_python: str, method: str, scheme: str, calib_file: Path, out: Path) -> float:
    """llm-compressor's run in its own interpreter; returns its quantization wall time."""
    command = [peer_python, str(ROOT / "bench" / "peer_llmcompressor.py"), "--model", str(MODEL_DIR),
               "--calib", str(calib_file), "--method", method, "--scheme", scheme, "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"llm-compressor {method} {scheme} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def score(loaded, text: str, folder: Path | None) -> float:
    """Perplexity of a checkpoint as compressed-tensors decompresses it (``None``: full precision)."""
    if folder is None:
        return perplexity(loaded.model, loaded.tokenizer, text, EVAL).perplexity
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
    from safetensors.torch import load_file

    tensors = {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
    weights = CompressedTensorsDequantizer(str(folder), dtype=torch.float32).process(tensors)
    model = copy.deepcopy(loaded.model)
    state = model.state_dict()
    replaced = {k: v for k, v in weights.items() if k.endswith(".weight") and k in state}
    missing = [k for k in state if k.endswith("_proj.weight") and k not in replaced]
    if missing:
        raise RuntimeError(f"{folder}: no weights for {missing[:3]}")
    model.load_state_dict(replaced, strict=False)
    return perplexity(model, loaded.tokenizer, text, EVAL).perplexity


def cached(done: dict, key: str, results_file: Path, compute) -> dict:
    """``done[key]``, computed (and saved with everything done so far) when missing."""
    if key not in done:
        start = time.perf_counter()
        done[key] = compute()
        print(f"{key}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        results_file.write_text(json.dumps(done, indent=1))
    return done[key]


def run_case(name: str, args, done: dict, run) -> dict:
    """One case: QuantLab's result, and the peer's when a peer is given, each computed once."""
    loaded, session, calib, calib_file, work, text, results_file = run
    method, scheme = CASES[name]
    suffix = f"{args.calib_samples}x{args.calib_len}"
    dtype = args.quantlab_scale_dtype or "fp16"

    def quantlab():
        out = work / f"quantlab-{name}-{dtype}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        seconds = quantlab_case(loaded, session, name, calib, out, args.quantlab_scale_dtype)
        return {"seconds": seconds, "ppl": score(loaded, text, out)}

    def peer():
        out = work / f"peer-{name}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        seconds = peer_case(args.peer_python, method, scheme, calib_file, out)
        return {"seconds": seconds, "ppl": score(loaded, text, out)}

    ours = cached(done, f"quantlab|{name}|{dtype}|{suffix}", results_file, quantlab)
    row = {"case": name + ("" if dtype == "fp16" else f" ({dtype} scales)"), "quantlab_seconds": ours["seconds"],
           "quantlab_ppl": ours["ppl"]}
    if args.peer_python:
        theirs = cached(done, f"peer|{name}|{suffix}", results_file, peer)
        row |= {"peer_seconds": theirs["seconds"], "peer_ppl": theirs["ppl"], "ratio": ours["ppl"] / theirs["ppl"]}
    return row


def table(rows: list[dict], fp_ppl: float) -> str:
    def ppl(value):
        return f"{value:.3f} ({100 * (value / fp_ppl - 1):+.2f}%)" if value is not None else "skipped"

    lines = [f"full precision: {fp_ppl:.3f}",
             "| case | QuantLab | llm-compressor | QuantLab / peer | QuantLab s | peer s |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ratio']:.4f}" if "ratio" in r else "-"
        peer_s = f"{r['peer_seconds']:.1f}" if "peer_seconds" in r else "-"
        lines.append(f"| {r['case']} | {ppl(r['quantlab_ppl'])} | {ppl(r.get('peer_ppl'))} | {ratio} | "
                     f"{r['quantlab_seconds']:.1f} | {peer_s} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", default=None, help="python of a virtual environment with llmcompressor")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-len", type=int, default=256)
    parser.add_argument("--work", default=str(ROOT / "bench" / "out" / "peers"), help="checkpoints and results")
    parser.add_argument("--fresh", action="store_true", help="ignore results of an earlier run")
    parser.add_argument("--quantlab-scale-dtype", default=None, choices=("fp16", "bf16", "fp32"),
                        help="store QuantLab's scales in this dtype (default: its fp16); llm-compressor keeps the "
                             "weight's dtype, fp32 for the bundled LM")
    args = parser.parse_args()
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"bench_peers: unknown case(s) {unknown}; choose from {', '.join(CASES)}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    loaded = load_model()
    text = load_text("heldout")
    calib = CalibConfig(n_samples=args.calib_samples, seq_len=args.calib_len, seed=0)
    session = QuantSession(loaded)
    calib_file = work / "calibration_windows.safetensors"
    ids = save_windows(loaded, calib, calib_file)
    assert torch.equal(session.calibration_ids(calib), ids)  # QuantLab calibrates on the saved windows
    if not args.peer_python:
        print("peer: skipped (no --peer-python given): llm-compressor column left empty; pass the python of a "
              "virtual environment with llmcompressor installed (see README, 'Against llm-compressor')")
    results_file = work / "results.json"
    done = {} if args.fresh or not results_file.exists() else json.loads(results_file.read_text())
    fp_ppl = done.get("fp") or score(loaded, text, None)
    done["fp"] = fp_ppl
    run = (loaded, session, calib, calib_file, work, text, results_file)
    rows = [run_case(name, args, done, run) for name in names]
    print(table(rows, fp_ppl))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
