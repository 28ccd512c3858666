"""The deployer's answer, shared by Quality vs bits and Compare: every run against a chosen baseline.

Δ % and % size saved against the baseline (bf16 by default: what checkpoints ship in), the standard error of
every number (paired over the same windows), differences within noise marked, the evaluation each number was
measured on, and the smallest configuration within a tolerance. The statistics live in
quantlab.analysis.runs and quantlab.evaluation.uncertainty; this module only shows them.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from pages.common import progress_callback, results_key
from pages.runs import RunSettings, cached_run
from quantlab.analysis import plots
from quantlab.analysis import runs as run_tables
from quantlab.errors import QuantLabError
from quantlab.evaluation.uncertainty import NOISE_SIGMAS
from quantlab.recipe import parse_config_name

BASELINE_LABELS = {"bf16": "bf16 (what checkpoints ship in)", "fp16": "fp16", "fp32": "fp32 (as trained)"}


def sidebar_format_name() -> str | None:
    """The sidebar format as a configuration name these pages take (None when the sidebar's is invalid)."""
    fmt = st.session_state.get("_format")
    return fmt.name if fmt is not None else None


def config_choices(defaults, sidebar_format: str | None) -> list[str]:
    """The default sweep's names, plus the sidebar's format when it is not one of them."""
    names = list(defaults)
    canonical = set()
    for name in names:
        canonical.add(parse_config_name(name).name)
    if sidebar_format and parse_config_name(sidebar_format).name not in canonical:
        names.append(sidebar_format)
    return names


def with_baseline(names) -> list[str]:
    """The names with full precision first (the baseline), once, whatever alias was typed for it."""
    rest = []
    for name in names:
        try:
            is_fp = parse_config_name(name).name == "fp"
        except QuantLabError:
            is_fp = False  # run_configurations reports the bad name
        if not is_fp:
            rest.append(name)
    return ["fp", *rest]


def run_configurations(names, settings: RunSettings, loaded) -> tuple:
    """Each configuration's results (reused when this model and settings already ran it, on either page)."""
    bar = progress_callback()
    results = []
    for index, name in enumerate(names):
        def step(fraction, message, index=index):
            bar((index + fraction) / len(names), f"[{index + 1}/{len(names)}] {message}")

        results.append(cached_run(results_key(), name, settings, loaded, step))
    bar(1.0, f"{len(names)} configurations done")
    return tuple(results)


def baseline_controls(prefix: str) -> tuple[str, float]:
    """The baseline to compare against and the tolerance of the recommendation."""
    left, right = st.columns(2)
    baseline = left.selectbox("Baseline", list(BASELINE_LABELS), format_func=BASELINE_LABELS.get,
                              key=f"{prefix}_baseline",
                              help="Sizes are compared with the full-precision model stored in this dtype. Its "
                                   "quality is the full-precision run's (bf16 rounding of the weights is not "
                                   "measured separately).")
    tolerance = right.number_input("Recommend the smallest configuration within (% of the baseline's quality)",
                                   0.0, 100.0, run_tables.DEFAULT_TOLERANCE_PCT, 0.5, key=f"{prefix}_tolerance")
    return baseline, float(tolerance)


def _noise(row) -> str:
    if row.baseline:
        return "baseline"
    if row.within_noise is None or row.within_noise != row.within_noise:
        return "SE unavailable"
    return "within noise" if row.within_noise else "beyond noise"


def evaluation_caption(table: pd.DataFrame) -> str:
    """What the numbers were measured on: tokens, context and stride (or sentences for an encoder)."""
    if "eval_tokens" in table:
        settings = table[["eval_tokens", "ctx", "stride"]].drop_duplicates()
        parts = [f"{int(r.eval_tokens):,} tokens, context {int(r.ctx)}, stride {int(r.stride)}"
                 for r in settings.itertuples()]
        return "Measured on " + "; ".join(parts) + " of held-out text (each row's own settings are in the table)."
    return f"Measured on {int(table['eval_sentences'].max())} sentences against the full-precision embeddings."


def show_answer(runs, prefix: str) -> tuple[pd.DataFrame, run_tables.Recommendation | None]:
    """Baseline, recommendation, the results table with Δ % ± SE; returns the table for charts and downloads."""
    baseline, tolerance = baseline_controls(prefix)
    table = run_tables.baseline_table(runs, baseline)
    metric = run_tables.quality_metric(runs)
    recommendation = run_tables.recommend(table, metric, tolerance)
    if recommendation is not None:
        st.success(recommendation.sentence())
    else:
        st.warning(f"No configuration here is within {tolerance:g} % of the {baseline} baseline's {metric}; "
                   "raise the tolerance or add configurations with more bits.")
    st.caption(evaluation_caption(table) + f" Δ is the change of {metric} against the baseline, ± one standard "
               f"error paired over the same windows (as llama.cpp's perplexity prints it); a change smaller than "
               f"{NOISE_SIGMAS:g} standard errors is marked *within noise*: more evaluation tokens would be needed "
               "to tell it from the baseline.")
    if not run_tables.has_standard_errors(table):
        st.info("SE unavailable: these runs carry no per-window losses (a record written before QuantLab kept "
                "them). Δ % is exact; re-run the sweep to get its standard error and the within-noise marks.")
    shown = table.assign(noise=[_noise(row) for row in table.itertuples()])
    columns = ["config", "method", "bits_per_weight", "size_mib", "size_saved_pct", metric, f"{metric}_se",
               "delta_pct", "delta_pct_se", "noise", "kl_divergence", "pareto", *[c for c in ("eval_tokens", "ctx", "stride", "eval_sentences")
                                                      if c in shown], "calibration_seconds", "seconds"]
    st.dataframe(shown[columns], hide_index=True, width="stretch", column_config={
        "bits_per_weight": st.column_config.NumberColumn("bits/weight", format="%.3f"),
        "size_mib": st.column_config.NumberColumn("size (MiB)", format="%.2f"),
        "size_saved_pct": st.column_config.NumberColumn(f"saved vs {baseline} (%)", format="%.1f"),
        metric: st.column_config.NumberColumn(metric, format="%.4f"),
        f"{metric}_se": st.column_config.NumberColumn("± SE", format="%.4f"),
        "delta_pct": st.column_config.NumberColumn(f"Δ vs {baseline} (%)", format="%+.3f"),
        "delta_pct_se": st.column_config.NumberColumn("Δ ± SE (%)", format="%.3f",
                                                      help="Paired over the same evaluation windows."),
        "noise": st.column_config.TextColumn("Δ vs noise", help=f"within noise: |Δ| < {NOISE_SIGMAS:g} SE"),
        "kl_divergence": st.column_config.NumberColumn("KL divergence", format="%.5f"),
        "calibration_seconds": st.column_config.NumberColumn("calibration set (s)", format="%.1f",
                                                             help="Building the calibration set: once per set, "
                                                                  "shared by every run that uses it."),
        "seconds": st.column_config.NumberColumn("run (s)", format="%.1f",
                                                 help="Quantizing, calibration-set building and evaluation excluded."),
    })
    return table, recommendation


def tradeoff_charts(table: pd.DataFrame, metric: str, recommendation, prefix: str) -> None:
    """Quality against bits and against size (error bars: ± 1 SE), and KL divergence when measured."""
    highlight = recommendation.config if recommendation else None
    lower = run_tables.lower_is_better(metric)
    # One above the other, full width: side by side, each plot area would be too narrow to name its points.
    st.plotly_chart(plots.tradeoff_figure(table, "bits_per_weight", metric, f"{metric} vs bits per weight",
                                          error=f"{metric}_se", highlight=highlight), key=f"{prefix}_bits")
    by_size = table.assign(pareto=run_tables.pareto_front(table, "size_mib", metric, lower))
    st.plotly_chart(plots.tradeoff_figure(by_size, "size_mib", metric, f"{metric} vs model size (MiB)",
                                          error=f"{metric}_se", highlight=highlight), key=f"{prefix}_size")
    if table["kl_divergence"].notna().any():
        st.plotly_chart(plots.tradeoff_figure(table, "bits_per_weight", "kl_divergence",
                                              "KL divergence from full precision vs bits per weight", front=None,
                                              highlight=highlight), key=f"{prefix}_kl")
        st.caption("KL divergence: how far the quantized model's next-token distribution moved from the "
                   "full-precision one, averaged over the evaluation tokens (0 = identical).")


if __name__ == "__main__":  # only Streamlit's legacy pages/ mode runs this module as a page: see pages/navigation.py
    from pages.navigation import route

    route()
