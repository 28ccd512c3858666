"""Mixed precision under a size budget: measure each linear's sensitivity, plan the formats, run and compare."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from quantlab.cli import emit, float_option, int_option, printable
from quantlab.cli.quantize_cmd import BUNDLED_LM, MAX_EVAL_TOKENS, add_run_options, calib_from_args, load_source, stderr_progress
from quantlab.errors import FormatError

MAX_BUDGET_MIB = 2.0**24  # 16 TiB: beyond any checkpoint


def add_parser(parser: argparse.ArgumentParser) -> None:
    from quantlab.analysis.plan import DEFAULT_CANDIDATES, SENSITIVITY_TOKENS
    from quantlab.analysis.planner import MAX_BPW, MIN_BPW

    parser.add_argument("source", nargs="?", default=None, help=f"hub id, model folder or bundled name (default: {BUNDLED_LM})")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-bpw", type=float_option(MIN_BPW, MAX_BPW), default=None,
                        help="bits per weight over the quantized linears, scales and zero-points included (e.g. 4.5)")
    budget.add_argument("--budget-mib", type=float_option(1e-6, MAX_BUDGET_MIB), default=None,
                        help="MiB for the whole model as stored (the layers kept in full precision included)")
    parser.add_argument("--candidates", default=",".join(DEFAULT_CANDIDATES),
                        help=f"comma-separated formats each linear may take (default {','.join(DEFAULT_CANDIDATES)})")
    parser.add_argument("--method", default="rtn", choices=("rtn", "gptq"),
                        help="how the plan is quantized (the sensitivities are RTN's either way)")
    parser.add_argument("--sens-tokens", type=int_option(16, MAX_EVAL_TOKENS), default=SENSITIVITY_TOKENS,
                        help=f"evaluation tokens per (linear, format) sensitivity measurement (default {SENSITIVITY_TOKENS})")
    parser.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                        help="also run every candidate on all linears on the same windows (default on)")
    add_run_options(parser)
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="export the plan (compressed-tensors, one config group per format) to DIR")
    parser.add_argument("--json", action="store_true", help="print JSON: the plan's layers and the comparison")


def _budget(args: argparse.Namespace):
    from quantlab.analysis.planner import Budget

    return Budget(bits_per_weight=args.budget_bpw, mib=args.budget_mib)


def _candidates(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise FormatError(f"--candidates {printable(text)[:40]!r} names no format; give e.g. int8,int4-g128,nvfp4")
    return names


def run(args: argparse.Namespace) -> int:
    from quantlab.analysis import plan as planning
    from quantlab.evaluation import EvalConfig
    from quantlab.runs.pipeline import SWEEP_EVAL_CTX, SWEEP_EVAL_TOKENS, QuantSession

    budget = _budget(args)  # bad input fails before the model loads
    names = _candidates(args.candidates)
    if args.out:
        from quantlab.runs.export import check_output_folder

        check_output_folder(Path(args.out))
    loaded, text = load_source(args)
    fmts = planning.candidate_formats(names, loaded)
    planning.check_budget(loaded, fmts, budget)  # a budget no plan fits fails now, not after the measuring
    context = getattr(loaded.model.config, "max_position_embeddings", None) or SWEEP_EVAL_CTX
    ctx = min(SWEEP_EVAL_CTX, context)
    progress = stderr_progress if sys.stderr.isatty() else None
    probe = QuantSession(loaded, text, EvalConfig(ctx=ctx, max_tokens=args.sens_tokens))
    sensitivity = planning.measure_sensitivity(probe, fmts, progress)
    plan = planning.make_plan(loaded, sensitivity, budget)
    session = QuantSession(loaded, text, EvalConfig(ctx=ctx, max_tokens=args.max_eval_tokens or SWEEP_EVAL_TOKENS))
    calib = calib_from_args(args, loaded.model)
    model, measured = _run_plan(session, plan, args.method, calib, progress)
    uniform = planning.run_uniform(session, [f.name for f in fmts], args.method, calib, progress) if args.compare else []
    base = session.quality(loaded.model)[sensitivity.metric]
    comparison = planning.comparison_table(plan, measured, uniform, base)
    document = {"model": loaded.name, "budget": budget.label, "method": args.method, "metric": sensitivity.metric,
                "full_precision": base, "sensitivity_tokens": args.sens_tokens,
                "layers": plan.table().to_dict("records"), "comparison": comparison.to_dict("records")}
    if args.out:
        from quantlab.runs.export import export_compressed

        document["export"] = str(export_compressed(model, args.out, loaded.tokenizer).path)
    emit(document, args.json, describe(plan, comparison, sensitivity.metric, base))
    return 0


def _run_plan(session, plan, method, calib, progress):
    from quantlab.runs.pipeline import quantize_model

    return quantize_model(session.loaded, plan.config(method, calib), progress, session=session)


def describe(plan, comparison, metric: str, base: float) -> str:
    table = plan.table()
    what = "KL" if metric == "perplexity" else "fidelity drop"
    lines = [f"plan under {plan.budget.label}: {plan.allocation.bits_per_weight:.3f} bits/weight, "
             f"{plan.total_bytes / 2**20:.3f} MiB; predicted {what} {plan.allocation.predicted_loss:.4f} "
             f"(the sum of each linear's {what} measured alone)",
             f"{'layer':<36} {'format':<17} {'bits/w':>7} {what:>9}"]
    lines += [f"{printable(r.layer):<36} {r.format:<17} {r.bits_per_weight:7.3f} {r.predicted_loss:9.5f}"
              for r in table.itertuples()]
    short = "ppl" if metric == "perplexity" else "fid"
    lines += ["", f"full precision {metric} {base:.4f}",
              f"{'config':<44} {'bits/w':>7} {'MiB':>7} {'pred KL':>8} {'meas KL':>8} {'pred ' + short:>9} {'meas ' + short:>9}"]
    for r in comparison.to_dict("records"):
        kls = [_figure(r.get(key), 8) for key in ("predicted_kl", "measured_kl")]
        lines.append(f"{printable(r['config'])[:44]:<44} {r['bits_per_weight']:7.3f} {r['size_mib']:7.3f} {' '.join(kls)} "
                     f"{_figure(r[f'predicted_{metric}'], 9)} {_figure(r[f'measured_{metric}'], 9)}")
    return "\n".join(lines)


def _figure(value, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}.4f}"
