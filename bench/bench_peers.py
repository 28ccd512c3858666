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
   ``--model minilm`` does the same for the bundled encoder, scored by embedding fidelity (mean
   cosine against full precision over the held-out text's sentences).
4. The ratio is QuantLab's loss over the peer's (perplexity; cosine distance 1 - fidelity for the
   encoder), <= 1 when QuantLab is at least as good, with its paired standard error over the same
   windows (sentences).

Results are kept per case and tool in ``WORK/results.json`` (a rerun skips what is already done;
``--fresh`` starts over; runs of different cases may go in parallel on one file).
``--quantlab-scale-dtype fp32`` reruns QuantLab's side with the scale dtype llm-compressor keeps
(the weight's), to see how much of a difference the fp16 scales make. Without ``--peer-python``
the peer column is skipped, with a line saying so.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
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
from quantlab.evaluation.fidelity import embed  # noqa: E402
from quantlab.evaluation.uncertainty import paired_difference, ratio_mean  # noqa: E402
from quantlab.evaluation.perplexity import perplexity  # noqa: E402
from quantlab.models.loading import BUNDLED_ENCODER, BUNDLED_LM, load_model  # noqa: E402
from quantlab.recipe import CalibConfig, parse_config_name  # noqa: E402
from quantlab.runs.export import export_compressed  # noqa: E402
from quantlab.runs.pipeline import QuantSession, quantize_model  # noqa: E402
from quantlab.texts.sources import sentences  # noqa: E402

# (QuantLab configuration, llm-compressor method, llm-compressor scheme)
CASES = {
    "rtn-int4-g128": ("rtn", "W4A16"),
    "rtn-int4-g128-asym": ("rtn", "W4A16_ASYM"),
    "gptq-int4-g128": ("gptq", "W4A16"),
    "gptq-int4-g128-asym": ("gptq", "W4A16_ASYM"),
    "awq-int4-g128": ("awq", "W4A16"),
    "awq-int4-g128-asym": ("awq", "W4A16_ASYM"),
    "rtn-int8": ("rtn", "W8A16_CHANNEL"),  # per-channel: the tool's W8A16 preset is g128
    "gptq-int8": ("gptq", "W8A16_CHANNEL"),
    "rtn-int3-g128": ("rtn", "W3A16_G128"),
    "gptq-int3-g128": ("gptq", "W3A16_G128"),
}
# The encoder (MiniLM) runs the methods llm-compressor's oneshot can apply to a BertModel: AWQ's
# smoothing mappings are written for decoder blocks (q/k/v after a norm), so it has none for BERT.
ENCODER_CASES = ("rtn-int4-g128", "rtn-int4-g128-asym", "gptq-int4-g128", "gptq-int4-g128-asym")
MODELS = {"lm": BUNDLED_LM, "minilm": BUNDLED_ENCODER}
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


def peer_case(peer_python: str, loaded, method: str, scheme: str, calib_file: Path, out: Path) -> float:
    """llm-compressor's run in its own interpreter; returns its quantization wall time."""
    command = [peer_python, str(ROOT / "bench" / "peer_llmcompressor.py"), "--model", loaded.source,
               "--calib", str(calib_file), "--method", method, "--scheme", scheme, "--out", str(out)]
    if loaded.kind == "encoder":
        command.append("--encoder")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"llm-compressor {method} {scheme} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def score(loaded, session: QuantSession, text: str, folder: Path | None) -> dict:
    """A checkpoint as compressed-tensors decompresses it (``None``: full precision), scored: perplexity
    and each window's summed NLL (LM), or fidelity and each sentence's cosine (encoder)."""
    model = loaded.model if folder is None else decompressed(loaded, folder)
    if loaded.kind == "encoder":  # the bundled held-out text's sentences, against the fp embeddings
        chosen = sentences(text, session.eval_config.n_sentences)
        embedded = embed(model, loaded.tokenizer, chosen, max_tokens=session.eval_config.max_sentence_tokens)
        cosines = torch.nn.functional.cosine_similarity(embedded.double(), session.reference().double(), dim=-1)
        return {"ppl": float(cosines.mean()), "cosines": cosines.tolist()}
    result = perplexity(model, loaded.tokenizer, text, EVAL)
    return {"ppl": result.perplexity, "window_nll": list(result.window_nll), "window_tokens": list(result.window_tokens)}


def decompressed(loaded, folder: Path):
    """A copy of the full-precision model with the linears' weights of ``folder``'s checkpoint."""
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
    from safetensors.torch import load_file

    tensors = {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
    weights = CompressedTensorsDequantizer(str(folder), dtype=torch.float32).process(tensors)
    model = copy.deepcopy(loaded.model)
    state = model.state_dict()
    replaced = {k: v for k, v in weights.items() if k.endswith(".weight") and k in state}
    missing = [i.name for i in loaded.structure.linears if f"{i.name}.weight" not in replaced]
    if missing:
        raise RuntimeError(f"{folder}: no weights for {missing[:3]}")
    model.load_state_dict(replaced, strict=False)
    return model


def paired_ratio(kind: str, ours: dict, theirs: dict) -> tuple[float, float]:
    """QuantLab's loss over the peer's (<= 1: QuantLab at least as good) and its paired standard error.

    LM: PPL ratio exp(mean NLL difference) over the same windows, SE by the delta method. Encoder:
    the ratio of mean cosine distances sum(1 - cos_q) / sum(1 - cos_p) over the same sentences, with
    the ratio estimator's SE (fidelity itself is higher-is-better)."""
    if kind == "causal":
        diff = paired_difference(ours["window_nll"], theirs["window_nll"], ours["window_tokens"])
        ratio = math.exp(diff.mean)
        return ratio, ratio * diff.se
    estimate = ratio_mean([1 - c for c in ours["cosines"]], [1 - c for c in theirs["cosines"]])
    return estimate.mean, estimate.se


def cached(done: dict, key: str, results_file: Path, compute) -> dict:
    """``done[key]``, computed (and saved with everything done so far) when missing.

    Several runs of this script (different cases, in parallel) may share one results file: a result
    another run saved is taken from the file, and one another run is computing (its lock file
    exists) is waited for rather than computed twice into the same checkpoint folder."""
    lock = results_file.with_name(key.replace("|", "_") + ".lock")
    while key not in done:
        if results_file.exists():
            done |= {k: v for k, v in json.loads(results_file.read_text()).items() if k == key}
        if key in done:
            break
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            time.sleep(10)  # another run holds it; its result lands in the file
            continue
        try:
            start = time.perf_counter()
            done[key] = compute()
            print(f"{key}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
            on_disk = json.loads(results_file.read_text()) if results_file.exists() else {}
            results_file.write_text(json.dumps(on_disk | done, indent=1))
        finally:
            lock.unlink(missing_ok=True)
    return done[key]


def run_case(name: str, args, done: dict, run) -> dict:
    """One case: QuantLab's result, and the peer's when a peer is given, each computed once."""
    loaded, session, calib, calib_file, work, text, results_file = run
    method, scheme = CASES[name]
    suffix = f"{args.calib_samples}x{args.calib_len}"
    dtype = args.quantlab_scale_dtype or "fp16"
    model = "" if args.model == "lm" else f"{args.model}|"  # the LM's keys as before, so old results still count
    folder = "" if args.model == "lm" else f"{args.model}-"
    ours_out, peer_out = work / f"{folder}quantlab-{name}-{dtype}", work / f"{folder}peer-{name}"

    def quantlab():
        subprocess.run(["rm", "-rf", str(ours_out)], check=True)
        seconds = quantlab_case(loaded, session, name, calib, ours_out, args.quantlab_scale_dtype)
        return {"seconds": seconds} | score(loaded, session, text, ours_out)

    def peer():
        subprocess.run(["rm", "-rf", str(peer_out)], check=True)
        seconds = peer_case(args.peer_python, loaded, method, scheme, calib_file, peer_out)
        return {"seconds": seconds} | score(loaded, session, text, peer_out)

    ours = with_losses(cached(done, f"{model}quantlab|{name}|{dtype}|{suffix}", results_file, quantlab),
                       loaded, session, text, ours_out)
    row = {"case": name + ("" if dtype == "fp16" else f" ({dtype} scales)"), "quantlab_seconds": ours["seconds"],
           "quantlab_ppl": ours["ppl"]}
    if args.peer_python:
        theirs = with_losses(cached(done, f"{model}peer|{name}|{scheme}|{suffix}", results_file, peer),
                             loaded, session, text, peer_out)
        ratio, se = paired_ratio(loaded.kind, ours, theirs)
        row |= {"peer_seconds": theirs["seconds"], "peer_ppl": theirs["ppl"], "ratio": ratio, "ratio_se": se}
    return row


def with_losses(result: dict, loaded, session, text: str, folder: Path) -> dict:
    """A cached result from before the per-window losses were kept, rescored from its saved checkpoint
    (the losses kept beside it, in ``folder/bench_losses.json``, so that a rescore happens once)."""
    if "window_nll" in result or "cosines" in result:
        return result
    saved = folder / "bench_losses.json"
    rescored = json.loads(saved.read_text()) if saved.exists() else score(loaded, session, text, folder)
    if abs(rescored["ppl"] - result["ppl"]) > 1e-6 * abs(result["ppl"]):
        raise RuntimeError(f"{folder} scores {rescored['ppl']} now against {result['ppl']} when it was made")
    saved.write_text(json.dumps(rescored))
    return result | rescored


def table(rows: list[dict], fp_ppl: float, kind: str) -> str:
    def value(v):
        if v is None:
            return "skipped"
        if kind == "encoder":
            return f"{v:.6f}"
        return f"{v:.3f} ({100 * (v / fp_ppl - 1):+.2f}%)"

    metric = "embedding fidelity (mean cosine)" if kind == "encoder" else f"perplexity (full precision {fp_ppl:.3f})"
    ratio_name = "(1-cos) QuantLab / peer" if kind == "encoder" else "QuantLab / peer"
    lines = [metric, f"| case | QuantLab | llm-compressor | {ratio_name} ± paired SE | QuantLab s | peer s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ratio']:.4f} ± {r['ratio_se']:.4f}" if "ratio" in r else "-"
        peer_s = f"{r['peer_seconds']:.1f}" if "peer_seconds" in r else "-"
        lines.append(f"| {r['case']} | {value(r['quantlab_ppl'])} | {value(r.get('peer_ppl'))} | {ratio} | "
                     f"{r['quantlab_seconds']:.1f} | {peer_s} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", default=None, help="python of a virtual environment with llmcompressor")
    parser.add_argument("--model", default="lm", choices=tuple(MODELS),
                        help=f"lm: {BUNDLED_LM} (perplexity); minilm: {BUNDLED_ENCODER} (embedding fidelity, "
                             f"cases {', '.join(ENCODER_CASES)})")
    parser.add_argument("--cases", default=None, help=f"comma-separated, from {', '.join(CASES)} (default: all the "
                                                      "model's cases)")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-len", type=int, default=256)
    parser.add_argument("--work", default=str(ROOT / "bench" / "out" / "peers"), help="checkpoints and results")
    parser.add_argument("--fresh", action="store_true", help="ignore results of an earlier run")
    parser.add_argument("--quantlab-scale-dtype", default=None, choices=("fp16", "bf16", "fp32"),
                        help="store QuantLab's scales in this dtype (default: its fp16); llm-compressor keeps the "
                             "weight's dtype, fp32 for the bundled LM")
    args = parser.parse_args()
    allowed = tuple(CASES) if args.model == "lm" else ENCODER_CASES
    names = [n.strip() for n in (args.cases or ",".join(allowed)).split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        print(f"bench_peers: unknown case(s) {unknown} for --model {args.model}; choose from {', '.join(allowed)}",
              file=sys.stderr)
        return 2
    torch.manual_seed(0)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    loaded = load_model(MODELS[args.model])
    text = load_text("heldout")
    calib = CalibConfig(n_samples=args.calib_samples, seq_len=args.calib_len, seed=0)
    session = QuantSession(loaded)
    calib_file = work / ("calibration_windows.safetensors" if args.model == "lm" else
                         f"calibration_windows-{args.model}.safetensors")
    ids = save_windows(loaded, calib, calib_file)
    assert torch.equal(session.calibration_ids(calib), ids)  # QuantLab calibrates on the saved windows
    if not args.peer_python:
        print("peer: skipped (no --peer-python given): llm-compressor column left empty; pass the python of a "
              "virtual environment with llmcompressor installed (see README, 'Against llm-compressor')")
    results_file = work / "results.json"
    if args.fresh:  # also the lock files a stopped run left behind
        for stale in [results_file, *work.glob("*.lock")]:
            stale.unlink(missing_ok=True)
    done = json.loads(results_file.read_text()) if results_file.exists() else {}
    fp_key = "fp" if args.model == "lm" else f"{args.model}|fp"
    fp = cached(done, fp_key, results_file, lambda: score(loaded, session, text, None))
    fp_ppl = fp["ppl"] if isinstance(fp, dict) else fp  # a bare number from before the losses were kept
    run = (loaded, session, calib, calib_file, work, text, results_file)
    rows = [run_case(name, args, done, run) for name in names]
    print(table(rows, fp_ppl, loaded.kind))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
