"""Run a list of quantization configurations on one model and record quality against size."""

from __future__ import annotations

import argparse
import sys

from quantlab.cli import emit, printable
from quantlab.errors import FormatError
from quantlab.cli.quantize_cmd import BUNDLED_LM, add_run_options, calib_from_args, load_source, stderr_progress

DEFAULT_NAMES = "fp,int8,int4-g128,int4-g64,int4-per-channel,int3-g128,gptq-int4-g128,awq-int4-g128,w8a8-smoothquant,kv-int8"


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", nargs="?", default=None, help=f"hub id, model folder or bundled name (default: {BUNDLED_LM})")
    parser.add_argument("--configs", default=None,
                        help=f"comma-separated configuration names, e.g. gptq-int4-g128,int8,w8a8-smoothquant,kv-int8 "
                             f"(default: {DEFAULT_NAMES})")
    add_run_options(parser)
    parser.add_argument("--out", default=None, metavar="FILE.json", help="write the sweep as a run record the app opens")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    parser.add_argument("--json", action="store_true", help="print JSON: one record per configuration")


def run(args: argparse.Namespace) -> int:
    from quantlab.calibrate.distributed import is_source_process
    from quantlab.runs.pipeline import SWEEP_EVAL_TOKENS, run_sweep, sweep_configs

    names = config_names(args.configs)
    if args.out:  # before the long work: a record that cannot be written fails now
        from quantlab.runs.records import check_record_path

        check_record_path(args.out, overwrite=args.force)
    loaded, text = load_source(args)
    configs = sweep_configs(names, calib_from_args(args, loaded.model))  # parse before the long work starts
    results = run_sweep(loaded, configs, stderr_progress if sys.stderr.isatty() and is_source_process() else None, text,
                        args.max_eval_tokens or SWEEP_EVAL_TOKENS)
    if not is_source_process():  # under torchrun rank 0 holds every configuration's result and writes
        return 0
    if args.out:
        from quantlab.runs.records import write_record

        write_record(args.out, results, loaded, kind="sweep", evaluation=args.text or "heldout")
    records = [row(r) for r in results]
    emit({"model": loaded.name, "runs": records, "out": args.out}, args.json, describe(records))
    return 0


def config_names(text: str | None) -> list[str] | None:
    """``--configs`` as a list; None (the default sweep) only when the option is absent."""
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise FormatError(f"--configs {printable(text)[:40]!r} names no configuration; give e.g. int8,int4-g128 "
                          "or leave it out for the default sweep")
    return names


def row(result) -> dict:
    """One configuration's summary line: config, bits, bytes, quality, KL, seconds."""
    quality = result.quality
    return {
        "config": result.config.name, "method": result.config.method, "bits_per_weight": result.bits_per_weight,
        "total_bytes": result.total_bytes, "perplexity": quality.get("perplexity"), "fidelity": quality.get("fidelity"),
        "kl_divergence": quality.get("kl_divergence"), "top1_agreement": quality.get("top1_agreement"),
        "seconds": result.seconds,
    }


def describe(records: list[dict]) -> str:
    lines = [f"{'config':<36} {'bits/w':>7} {'MiB':>8} {'ppl/fid':>9} {'KL':>8} {'s':>6}"]
    for r in records:
        quality = r["perplexity"] if r["perplexity"] is not None else r["fidelity"]
        kl = f"{r['kl_divergence']:8.4f}" if r["kl_divergence"] is not None else f"{'-':>8}"
        lines.append(f"{printable(r['config']):<36} {r['bits_per_weight']:7.3f} {r['total_bytes'] / 2**20:8.2f} "
                     f"{quality if quality is None else round(quality, 4)!s:>9} {kl} {r['seconds']:6.1f}")
    return "\n".join(lines)
