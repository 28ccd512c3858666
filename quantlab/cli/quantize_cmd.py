"""Quantize a model with RTN, GPTQ, AWQ or SmoothQuant, evaluate it, and optionally export it."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from quantlab.cli import add_dtype_option, emit, float_option, int_option, printable
from quantlab.cli.size_cmd import BUNDLED_LM, FORMATS, format_from_args

log = logging.getLogger("quantlab.cli")
METHODS = ("rtn", "gptq", "awq", "smoothquant")
# Upper bounds of the numeric options (lower ones are the configurations' own, with their advice).
MAX_GROUP = 2**20  # values per scale: beyond any layer's width
MAX_CALIB_SAMPLES = 2**16  # GPTQ uses 128; 65,536 windows is hours of work on any model
MAX_CALIB_LEN = 2**20  # tokens per window: beyond any model's context
MAX_EVAL_TOKENS = 2**26


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", nargs="?", default=None, help=f"hub id, model folder or bundled name (default: {BUNDLED_LM})")
    parser.add_argument("--method", default="rtn", choices=METHODS, help="quantization algorithm (default rtn)")
    parser.add_argument("--format", default="int4", choices=FORMATS, help="weight number format (default int4)")
    parser.add_argument("--group-size", type=int_option(-2**31, MAX_GROUP), default=None,
                        help="values per scale along the input: N>0 groups, 0 per-channel, -1 per-tensor (default per-channel)")
    parser.add_argument("--asym", action="store_true", help="asymmetric integers (adds a zero-point per scale)")
    parser.add_argument("--restricted", action="store_true",
                        help="symmetric integers on the restricted range -(2^(b-1)-1)..2^(b-1)-1, s = absmax/qmax "
                             "(default: the full range, s = absmax/7.5 at INT4, as compressed-tensors)")
    parser.add_argument("--scale-dtype", default="fp16", choices=("fp16", "bf16", "fp32"), help="how scales are stored")
    add_run_options(parser)
    parser.add_argument("--act", default=None, choices=("int8", "int4"), help="also quantize linear inputs (W8A8, W4A8)")
    parser.add_argument("--act-mode", default="dynamic", choices=("dynamic", "static"),
                        help="dynamic per-token scales, or static per-tensor scales from calibration")
    parser.add_argument("--act-observer", default="minmax", choices=("minmax", "percentile", "mse"),
                        help="how static activation scales are calibrated")
    parser.add_argument("--kv", default=None, choices=("int8", "int4", "fp8-e4m3"), help="quantize the KV cache")
    parser.add_argument("--kv-granularity", default="per-token", choices=("per-token", "per-head"))
    parser.add_argument("--damp", type=float_option(-1e6, 1e6), default=0.01,
                        help="GPTQ damping, a fraction of mean(diag H) (default 0.01)")
    parser.add_argument("--block-size", type=int_option(1, 2**20), default=128, help="GPTQ columns per lazy batch (default 128)")
    parser.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                        help="GPTQ: quantize columns by decreasing diag(H) (default on, as llm-compressor's "
                             "actorder=static); --no-act-order keeps the plain column order")
    parser.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=None,
                        help="GPTQ: group scales from the original weights (default: on with act-order, "
                             "off without)")
    parser.add_argument("--alpha", type=float_option(-1e6, 1e6), default=0.5, help="SmoothQuant migration strength in [0, 1]")
    parser.add_argument("--out", default=None, metavar="DIR", help="export the quantized model (compressed-tensors) to DIR")
    parser.add_argument("--sequential", action="store_true",
                        help="models larger than memory: keep the blocks on disk, read, quantize and write one at a "
                             "time straight into --out (rtn/gptq, weight-only; no evaluation: run `eval DIR` after); "
                             "a stopped run resumes when started again")
    parser.add_argument("--calib-batch", type=int_option(1, MAX_CALIB_SAMPLES), default=None, metavar="N",
                        help="with --sequential: calibration windows per forward pass (default: 512 tokens' worth); "
                             "one batch of all windows holds the least Hessian memory on wide models")
    parser.add_argument("--record", default=None, metavar="FILE", help="write a run record (JSON) the app can open")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --record file")
    parser.add_argument("--json", action="store_true", help="print JSON: perplexity/fidelity, sizes, seconds, layers")


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Options shared with ``sweep``: calibration, evaluation, device."""
    parser.add_argument("--calib-samples", type=int_option(-2**31, MAX_CALIB_SAMPLES), default=None,
                        help="calibration windows (default: 32; for models over 50M parameters 16 on a CPU, 128 on a GPU)")
    parser.add_argument("--calib-len", type=int_option(-2**31, MAX_CALIB_LEN), default=None,
                        help="tokens per window (default: 256; for models over 50M parameters 512 on a CPU, 2048 on a GPU)")
    parser.add_argument("--calib-source", default="train", help="train (bundled text), heldout, a .txt file or wikitext2")
    parser.add_argument("--seed", type=int_option(0, 2**32 - 1), default=0, help="which calibration windows are drawn")
    parser.add_argument("--text", default=None, help="evaluation text: heldout (default), a .txt file or wikitext2")
    parser.add_argument("--max-eval-tokens", type=int_option(1, MAX_EVAL_TOKENS), default=None, help="cap on evaluation tokens")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    add_dtype_option(parser)
    parser.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the hub")


def calib_from_args(args: argparse.Namespace, model):
    from quantlab.recipe import CalibConfig

    overrides = {"seed": args.seed, "source": args.calib_source}
    if args.calib_samples is not None:
        overrides["n_samples"] = args.calib_samples
    if args.calib_len is not None:
        overrides["seq_len"] = args.calib_len
    return CalibConfig.for_model(model, **overrides)


def config_from_args(args: argparse.Namespace, model):
    from quantlab.recipe import ActSpec, GPTQParams, KVSpec, QuantConfig

    act = None
    if args.act is not None:
        granularity = "per-token" if args.act_mode == "dynamic" else "per-tensor"
        act = ActSpec(int(args.act[3:]), args.act_mode, args.act_observer, granularity)
    return QuantConfig(
        method=args.method, weight_format=format_from_args(args), act=act,
        kv=KVSpec(args.kv, args.kv_granularity) if args.kv else None, calib=calib_from_args(args, model),
        gptq=GPTQParams(damp=args.damp, block_size=args.block_size, act_order=args.act_order,
                        static_groups=args.act_order if args.static_groups is None else args.static_groups),
        smooth_alpha=args.alpha,
    )


def load_source(args: argparse.Namespace):
    from quantlab.evaluation import load_text
    from quantlab.models.loading import load_model

    from quantlab.device import resolve_device

    resolve_device(args.device)  # a bogus --device fails before the model loads
    limit = args.max_eval_tokens * 64 if args.max_eval_tokens else None  # read no more text than it can use
    text = load_text(args.text, max_chars=limit) if args.text else None
    loaded = load_model(args.source, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    return loaded, text


def stderr_progress(fraction: float, message: str) -> None:
    """A one-line progress bar on stderr, redrawn in place."""
    width = 30
    filled = int(round(width * min(max(fraction, 0.0), 1.0)))
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {100 * fraction:5.1f}% {message[:60]:<60}")
    if fraction >= 1.0:
        sys.stderr.write("\n")
    sys.stderr.flush()


def line_progress(fraction: float, message: str) -> None:
    """Progress as one line per step, for a long run whose stderr is a log file, not a terminal."""
    print(f"quantlab: {100 * fraction:5.1f}% {message}", file=sys.stderr, flush=True)


def announce(loaded, config) -> bool:
    """Say on stderr what a long run (a model over 50M parameters) will do; True when it did."""
    from quantlab.recipe import LARGE_MODEL_PARAMS
    from quantlab.runs.pipeline import plan_run

    if config.method == "fp" or sum(p.numel() for p in loaded.model.parameters()) < LARGE_MODEL_PARAMS:
        return False
    print(f"quantlab: {plan_run(loaded, config).describe()}; after block 1 (the probe) each step shows "
          "s/block and the time left; Ctrl-C stops", file=sys.stderr, flush=True)
    return True


def run(args: argparse.Namespace) -> int:
    from quantlab.calibrate.distributed import is_source_process
    from quantlab.runs.pipeline import quantize_model

    check_outputs(args)  # an unusable --out or --record fails now, not after the long work
    if args.sequential:
        return run_sequential(args)
    loaded, text = load_source(args)
    config = config_from_args(args, loaded.model)
    if args.out:  # refuse a non-empty --out folder before the long work, not after it
        from quantlab.runs.export import check_output_folder

        check_output_folder(Path(args.out))
    source = is_source_process()  # under torchrun every rank calibrates; rank 0 evaluates and writes
    long_run = source and announce(loaded, config)
    progress = stderr_progress if sys.stderr.isatty() else (line_progress if long_run else None)
    model, result = quantize_model(loaded, config, progress if source else None, text, args.max_eval_tokens,
                                   evaluate_quality=source)
    if not source:
        return 0
    document = summary(result)
    for warning in result.warnings:  # stderr (after the work, one line each), so --json stays one document
        log.warning("%s", warning)
    if args.out:
        from quantlab.runs.export import export_compressed

        document["export"] = str(export_compressed(model, args.out, loaded.tokenizer).path)
    if args.record:
        from quantlab.runs.records import write_record

        write_record(args.record, [result], loaded, kind="quantize")
        document["record"] = args.record
    emit(document, args.json, describe(result))
    return 0


def run_sequential(args: argparse.Namespace) -> int:
    """``--sequential``: one block in memory at a time, each written to the export as it is done."""
    from quantlab.device import resolve_device
    from quantlab.errors import FormatError
    from quantlab.models.lazy import open_lazy
    from quantlab.runs.sequential import check_sequential, partial_folder, quantize_sequential

    if not args.out:
        raise FormatError("--sequential writes the quantized model straight into an export: give --out DIR")
    if args.record:
        raise FormatError("--record is not available with --sequential (nothing is evaluated); --json prints the "
                          "per-layer results")
    resolve_device(args.device)
    lazy = open_lazy(args.source, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    config = config_from_args(args, lazy.model)
    check_sequential(lazy, config)
    announce(lazy, config)

    def block_line(report) -> None:
        print(f"quantlab: {report.describe()}", file=sys.stderr, flush=True)

    progress = stderr_progress if sys.stderr.isatty() else line_progress
    try:
        result = quantize_sequential(lazy, config, args.out, progress, on_block=block_line, batch_size=args.calib_batch)
    except KeyboardInterrupt:
        print(f"\nquantize: interrupted (Ctrl-C); the finished blocks are kept in {partial_folder(Path(args.out))}: "
              "run the same command again to resume", file=sys.stderr, flush=True)
        return 130
    document = summary(result.run) | {"export": str(result.export), "resumed_from_block": result.resumed_from,
                                      "blocks": [vars(b) for b in result.blocks]}
    emit(document, args.json, describe(result.run) + f"\nexported to {result.export} (not evaluated: run "
                                                      f"`quantlab eval {result.export} --sequential`)")
    return 0


def check_outputs(args: argparse.Namespace) -> None:
    """--out must be a new or empty folder and --record a new file (or --force), both writable."""
    if args.out:
        from quantlab.runs.export import check_output_folder

        check_output_folder(Path(args.out))
    if args.record:
        from quantlab.runs.records import check_record_path

        check_record_path(args.record, overwrite=args.force)


def summary(result) -> dict:
    """The run as JSON, with the headline quality numbers also at the top level."""
    quality = {k: v for k, v in result.quality.items() if k != "definitions"}
    return quality | result.to_dict() | {"warnings": list(result.warnings)}


def describe(result) -> str:
    quality = result.quality
    metric = "perplexity" if "perplexity" in quality else "fidelity"
    lines = [
        f"{result.config.name}: {result.bits_per_weight:.3f} bits/weight, {result.total_bytes:,} bytes, "
        f"quantized in {result.seconds:.1f} s",
    ]
    if result.config.method == "gptq":
        lines.append(f"GPTQ: {result.config.gptq.label}")
    if metric in quality:
        kl = f", KL {quality['kl_divergence']:.4f}" if "kl_divergence" in quality else ""
        lines.append(f"{metric} {quality[metric]:.4f}{kl}")
    if result.layers:
        lines.append(f"{'layer':<40} {'out err':>9} {'w err':>9} {'clipped':>8}")
        lines += [f"{printable(r.name):<40} {r.output_error:9.2e} {r.weight_error:9.2e} {r.clipped_fraction:8.4f}" for r in result.layers]
    return "\n".join(lines)
