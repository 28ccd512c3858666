"""Quantization runs as tables: sweeps, the Pareto front, per-layer errors, sensitivity, generations.

The runs themselves come from :mod:`quantlab.runs.pipeline` (``RunResult``) or from a record file
(:mod:`quantlab.runs.records`); here they become DataFrames that plot and download as they are.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from quantlab.recipe import RunResult
from quantlab.models.architectures import describe, find_linears, weight_matrix
from quantlab.errors import DataError
from quantlab.evaluation.uncertainty import paired_difference, within_noise
from quantlab.numerics.formats import QuantFormat
from quantlab.runs.pipeline import QuantSession
from quantlab.numerics.primitives import quantize
from quantlab.models.quantized import QuantizedLinear, build_quantized_model, set_submodule

Progress = Callable[[float, str], None]
QUALITY_METRICS = ("perplexity", "fidelity")


def quality_metric(runs: Sequence[RunResult]) -> str:
    """``perplexity`` for causal LMs, ``fidelity`` for encoders: whichever the runs measured."""
    for metric in QUALITY_METRICS:
        if any(metric in run.quality for run in runs):
            return metric
    raise DataError("these runs carry no perplexity or fidelity; run them with evaluation on")


def lower_is_better(metric: str) -> bool:
    return metric != "fidelity"


def runs_table(runs: Sequence[RunResult]) -> pd.DataFrame:
    """One row per run: configuration, method, bits per weight, size, quality, KL, top-1, seconds."""
    if not runs:
        raise DataError("no runs to show; run a sweep or open a sweep file")
    metric = quality_metric(runs)
    rows = [{
        "config": run.config.name, "method": run.config.method, "bits_per_weight": run.bits_per_weight,
        "total_bytes": run.total_bytes, "size_mib": run.total_bytes / 2**20, metric: run.quality.get(metric),
        "kl_divergence": run.quality.get("kl_divergence"), "top1_agreement": run.quality.get("top1_agreement"),
        "seconds": run.seconds, "calibration_seconds": run.calibration_seconds,
    } for run in runs]
    table = pd.DataFrame(rows)
    table["pareto"] = pareto_front(table, "bits_per_weight", metric, lower_is_better(metric))
    return table


# The storage a deployer compares against: what checkpoints ship in (bf16/fp16) by default, fp32 on request.
BASELINE_BITS = {"bf16": 16, "fp16": 16, "fp32": 32}
DEFAULT_TOLERANCE_PCT = 1.0  # "the smallest configuration within 1 % of the baseline's quality"


def _is_full_precision(run: RunResult) -> bool:
    return run.config.method == "fp" and run.config.act is None and run.config.kv is None


def _baseline_run(runs: Sequence[RunResult]) -> RunResult:
    for run in runs:
        if _is_full_precision(run):
            return run
    raise DataError("the comparison needs the full-precision run (configuration fp) measured with these runs; "
                    "add fp to the configurations")


def _baseline_bytes(fp: RunResult, baseline: str) -> float:
    """The full-precision model's bytes if every tensor were stored in ``baseline``'s dtype."""
    if baseline not in BASELINE_BITS:
        raise DataError(f"unknown baseline {baseline!r}; use one of {', '.join(BASELINE_BITS)}")
    return fp.total_bytes * BASELINE_BITS[baseline] / fp.bits_per_weight


def _delta_pct(run: RunResult, fp: RunResult, metric: str) -> tuple[float, float]:
    """Change of ``metric`` against the baseline in percent, and its paired standard error (NaN if unknown)."""
    value, base = run.quality.get(metric), fp.quality.get(metric)
    if value is None or base is None:
        return math.nan, math.nan
    if run is fp:
        return 0.0, 0.0
    if metric == "fidelity":  # cosines against the full-precision embeddings: paired by construction
        return 100 * (value / base - 1), 100 * run.quality.get("fidelity_se", math.nan) / base
    sums, base_sums = run.quality.get("window_nll"), fp.quality.get("window_nll")
    if not sums or not base_sums or len(sums) != len(base_sums):  # an older record, or different windows
        return 100 * (value / base - 1), math.nan
    diff = paired_difference(sums, base_sums, run.quality["window_tokens"])
    ratio = math.exp(diff.mean)  # PPL(run) / PPL(baseline) over the same windows
    return 100 * (ratio - 1), 100 * ratio * diff.se


def _metric_se(run: RunResult, metric: str) -> float:
    se = run.quality.get(f"{metric}_se")
    return math.nan if se is None else float(se)


def _eval_columns(run: RunResult) -> dict:
    """What the quality was measured on, shown on every row: a number means little without it."""
    quality = run.quality
    if "tokens" in quality:
        return {"eval_tokens": quality["tokens"], "ctx": quality.get("ctx"), "stride": quality.get("stride")}
    return {"eval_sentences": quality.get("n_sentences")}


def baseline_table(runs: Sequence[RunResult], baseline: str = "bf16") -> pd.DataFrame:
    """One row per run against the full-precision run stored as ``baseline`` (bf16, fp16 or fp32).

    Adds the metric's standard error, ``delta_pct`` (change against the baseline, %) with its paired
    standard error, ``within_noise`` (|delta| < 2 SE; None when the SE is unknown, as in records written
    before per-window losses were kept), ``size_saved_pct`` against the baseline's bytes, and the
    evaluation tokens, context and stride the row was measured with.
    """
    table = runs_table(runs)
    metric = quality_metric(runs)
    fp = _baseline_run(runs)
    base_bytes = _baseline_bytes(fp, baseline)
    # The baseline row is the full-precision run as the baseline would store it; its quality is the run's own
    # (measured at the dtype the model was loaded in: bf16 rounding of the weights is not measured separately).
    row = next(i for i, run in zip(table.index, runs) if run is fp)
    table.loc[row, ["bits_per_weight", "total_bytes", "size_mib"]] = (
        float(BASELINE_BITS[baseline]), int(base_bytes), base_bytes / 2**20)
    extra = []
    for run in runs:
        delta, delta_se = _delta_pct(run, fp, metric)
        extra.append({
            f"{metric}_se": _metric_se(run, metric), "delta_pct": delta, "delta_pct_se": delta_se,
            "within_noise": None if run is fp else within_noise(delta, delta_se),
            "size_saved_pct": 0.0 if run is fp else 100 * (1 - run.total_bytes / base_bytes), "baseline": run is fp,
            **_eval_columns(run),
        })
    table = pd.concat([table, pd.DataFrame(extra, index=table.index)], axis=1)
    position = table.columns.get_loc(metric) + 1
    ordered = [*table.columns[:position], f"{metric}_se", "delta_pct", "delta_pct_se", "within_noise",
               "size_saved_pct"]
    table = table[ordered + [c for c in table.columns if c not in ordered]]
    table["pareto"] = pareto_front(table, "bits_per_weight", metric, lower_is_better(metric))
    table.attrs["baseline"] = baseline
    return table


def has_standard_errors(table: pd.DataFrame) -> bool:
    """Whether the quantized rows of a :func:`baseline_table` carry paired standard errors."""
    quantized = table[~table["baseline"]]
    return bool(quantized["delta_pct_se"].notna().any()) if len(quantized) else True


@dataclass(frozen=True)
class Recommendation:
    """The smallest configuration whose quality is within ``tolerance_pct`` of the baseline's."""

    config: str
    size_mib: float
    size_saved_pct: float
    delta_pct: float
    delta_pct_se: float
    within_noise: bool | None
    tolerance_pct: float
    baseline: str

    def __post_init__(self) -> None:
        if not self.tolerance_pct >= 0:
            raise DataError(f"the tolerance must be a percentage of at least 0, got {self.tolerance_pct}")

    def sentence(self) -> str:
        se = f" ± {self.delta_pct_se:.2f} %" if math.isfinite(self.delta_pct_se) else " (SE unavailable)"
        noise = ", within noise" if self.within_noise else ""
        return (f"Smallest configuration within {self.tolerance_pct:g} % of the {self.baseline} baseline: "
                f"**{self.config}**, {self.size_mib:.2f} MiB ({self.size_saved_pct:.0f} % smaller), "
                f"quality change {self.delta_pct:+.2f} %{se}{noise}")


def recommend(table: pd.DataFrame, metric: str, tolerance_pct: float = DEFAULT_TOLERANCE_PCT) -> Recommendation | None:
    """Among the quantized rows of :func:`baseline_table`, the smallest whose quality loss is within tolerance.

    The loss is the perplexity's rise (or the fidelity's drop) in percent; ties in size go to the smaller loss.
    None when no configuration is within the tolerance.
    """
    loss = table["delta_pct"] * (1 if lower_is_better(metric) else -1)
    fits = table[~table["baseline"] & (loss <= tolerance_pct)].assign(loss=loss)
    if fits.empty:
        return None
    row = fits.sort_values(["total_bytes", "loss"]).iloc[0]
    return Recommendation(row["config"], float(row["size_mib"]), float(row["size_saved_pct"]),
                          float(row["delta_pct"]), float(row["delta_pct_se"]),
                          None if pd.isna(row["within_noise"]) else bool(row["within_noise"]), tolerance_pct,
                          table.attrs.get("baseline", "full-precision"))


def pareto_front(table: pd.DataFrame, x: str, y: str, lower_y_is_better: bool = True) -> pd.Series:
    """True for rows no other row beats on both ``x`` (smaller is better) and ``y``.

    A row is dominated when another is at least as good on both and strictly better on one.
    Rows with a missing ``y`` are never on the front.
    """
    xs = table[x].to_numpy(dtype=float)
    ys = table[y].to_numpy(dtype=float) * (1 if lower_y_is_better else -1)
    on_front = []
    for i in range(len(table)):
        if np.isnan(ys[i]):
            on_front.append(False)
            continue
        better_or_equal = (xs <= xs[i]) & (ys <= ys[i])
        strictly = (xs < xs[i]) | (ys < ys[i])
        on_front.append(not np.any(better_or_equal & strictly & ~np.isnan(ys)))
    return pd.Series(on_front, index=table.index)


def layer_errors(runs: Sequence[RunResult]) -> pd.DataFrame:
    """Long table, one row per (run, layer): output error, weight error, clipped share."""
    rows = [{
        "config": run.config.name, "layer": layer.name, "block": layer.block, "role": layer.role,
        "output_error": layer.output_error, "weight_error": layer.weight_error,
        "clipped_fraction": layer.clipped_fraction,
    } for run in runs for layer in run.layers]
    return pd.DataFrame(rows, columns=["config", "layer", "block", "role", "output_error", "weight_error",
                                       "clipped_fraction"])


def linear_roles(model: torch.nn.Module) -> list[str]:
    """The roles of the model's quantizable linears (q, k, v, o, gate, up, down, ...), sorted."""
    return sorted({info.role for info in find_linears(model)})


def _one_layer_quantized(model: torch.nn.Module, name: str, fmt: QuantFormat) -> torch.nn.Module:
    """A view of ``model`` in which only linear ``name`` is quantized; the original is untouched.

    The linear's block is deep-copied (one block, not the model) and every other module is shared.
    """
    structure = describe(model)
    blocks = structure.blocks(model)
    local = name.removeprefix(f"{structure.block_path}.")
    index, _, inside = local.partition(".")
    block = copy.deepcopy(blocks[int(index)])
    module = block.get_submodule(inside)
    W = weight_matrix(module).detach()  # (out, in)
    set_submodule(block, inside, QuantizedLinear.from_linear(module, quantize(W, fmt)))
    return build_quantized_model(model, [block if i == int(index) else b for i, b in enumerate(blocks)])


def layer_sensitivity(session: QuantSession, fmt: QuantFormat, roles: Sequence[str] | None = None,
                      progress: Progress | None = None) -> pd.DataFrame:
    """Quantize one linear at a time to ``fmt`` (RTN) and measure the quality change against full precision.

    Returns one row per layer: its quality, KL divergence, and the change from full precision
    (``delta``: for perplexity the rise, for fidelity the drop; ``relative_delta`` as a fraction).
    """
    loaded = session.loaded
    model = loaded.model
    infos = [info for info in loaded.structure.linears if roles is None or info.role in roles]
    if not infos:
        raise DataError(f"no linear layers with roles {list(roles or [])}; choose other roles")
    base = session.quality(model)
    metric = next(m for m in QUALITY_METRICS if m in base)
    sign = 1 if lower_is_better(metric) else -1
    rows = []
    for i, info in enumerate(infos):
        if progress is not None:
            progress(i / len(infos), f"{info.name} in {fmt.name}")
        quality = session.quality(_one_layer_quantized(model, info.name, fmt))
        delta = sign * (quality[metric] - base[metric])
        rows.append({"layer": info.name, "block": info.block, "role": info.role, "format": fmt.name,
                     metric: quality[metric], "kl_divergence": quality.get("kl_divergence"),
                     "delta": delta, "relative_delta": delta / base[metric] if base[metric] else float("nan")})
    if progress is not None:
        progress(1.0, "sensitivity done")
    return pd.DataFrame(rows)


@torch.no_grad()
def generate_text(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int = 48) -> str:
    """Greedy continuation of ``prompt`` (deterministic, so two models' outputs compare)."""
    if not prompt.strip():
        raise DataError("the prompt is empty; type a few words (or a line of Python for the bundled model)")
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    output = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)
