"""Mixed precision under a size budget: measure each linear's sensitivity, plan, run the plan, compare.

1. ``measure_sensitivity``: for every candidate format and every linear, quantize only that linear
   (RTN) and evaluate the model on the evaluation windows. The loss of a choice is the model's KL
   divergence from full precision, in nats per token (for an encoder, the drop of the embedding
   fidelity). This is the direct measure, not a proxy such as a layer's output error: it costs one
   evaluation per (linear, format), so it runs on a short text (``SENSITIVITY_TOKENS``). KL rather
   than the perplexity's rise because it does not depend on the next tokens of the text: on 4,096
   tokens a single layer's perplexity change is mostly the text's noise (and often negative), while
   KL is never negative and a quarter of the 8-bit layers' changes is not lost in it.
2. ``make_plan``: the formats of least summed loss within the budget (:mod:`quantlab.analysis.planner`),
   the bytes of each choice counted exactly as the Size page counts them.
3. ``run_plan`` / ``run_uniform``: the plan through the ordinary pipeline (a ``QuantConfig`` with
   per-layer formats), and each candidate on every layer, evaluated on the same windows, so the
   measured perplexity sits next to the predicted one and next to the uniform formats.

The predicted KL is the sum of the chosen losses: it assumes the layers' divergences add, which
the measured run tests. The predicted perplexity, ``PPL_fp x exp(predicted KL)``, further takes the
mean log-likelihood loss to rise by the KL (true when the model's own predictions are calibrated);
both sit next to the measured values. For GPTQ the losses are still RTN's, so the prediction is an
upper bound of what GPTQ loses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd

from quantlab.analysis.planner import Allocation, Budget, LayerChoices, LayerOption, allocate
from quantlab.analysis.runs import QUALITY_METRICS, layer_sensitivity
from quantlab.errors import DataError, FormatError
from quantlab.models.sizing import model_size
from quantlab.numerics.formats import QuantFormat
from quantlab.numerics.primitives import check_format_fits
from quantlab.recipe import MIXED_METHODS, CalibConfig, QuantConfig, RunResult
from quantlab.runs.pipeline import QuantSession, quantize_model

Progress = Callable[[float, str], None]
DEFAULT_CANDIDATES = ("int8", "int4-g128", "int3-g128", "nvfp4")
SENSITIVITY_TOKENS = 4096  # evaluation tokens per (linear, format): 112 evaluations on the bundled LM


@dataclass(frozen=True)
class Sensitivity:
    """Each linear's loss in each candidate format, measured alone."""

    metric: str  # "perplexity" or "fidelity"
    base: float  # the full-precision model's value on the same windows
    table: pd.DataFrame  # layer, block, role, format, <metric>, kl_divergence, loss (KL, or fidelity drop), params
    candidates: tuple[str, ...]

    def loss(self, layer: str, fmt_name: str) -> float:
        rows = self.table[(self.table["layer"] == layer) & (self.table["format"] == fmt_name)]
        return float(rows["loss"].iloc[0])


def candidate_formats(names: Sequence[str], loaded) -> tuple[QuantFormat, ...]:
    """The candidate formats, each checked against every linear of the model (a clear error if one does not fit)."""
    if not names:
        raise FormatError("give at least one candidate format, e.g. int8,int4-g128,int3-g128,nvfp4")
    fmts = tuple(dict.fromkeys(QuantFormat.parse(name) for name in names))
    for fmt in fmts:
        for info in loaded.structure.linears:
            try:
                check_format_fits((info.out_features, info.in_features), fmt)
            except FormatError as exc:
                raise FormatError(f"candidate {fmt.name} cannot store {info.name} "
                                  f"({info.out_features}x{info.in_features}): {exc}") from None
    return fmts


def _losses(metric: str, table: pd.DataFrame, base: float) -> list[float]:
    """Quality lost, additive across layers: the KL divergence in nats per token, or the fidelity's drop."""
    if metric == "perplexity":
        return [float(kl) for kl in table["kl_divergence"]]
    return [base - value for value in table[metric]]


def measure_sensitivity(session: QuantSession, fmts: Sequence[QuantFormat], progress: Progress | None = None) -> Sensitivity:
    """One evaluation per (linear, candidate): only that linear quantized (RTN), the rest full precision."""
    base_quality = session.quality(session.loaded.model)
    metric = next((m for m in QUALITY_METRICS if m in base_quality), None)
    if metric is None:
        raise DataError("this model gives no perplexity or fidelity (no tokenizer?); a plan needs a quality measure")
    params = {info.name: info.out_features * info.in_features for info in session.loaded.structure.linears}
    tables = []
    for i, fmt in enumerate(fmts):
        def step(fraction: float, message: str, i=i) -> None:
            if progress is not None:
                progress((i + fraction) / len(fmts), f"sensitivity: {message}")

        table = layer_sensitivity(session, fmt, progress=step)
        table["loss"] = _losses(metric, table, base_quality[metric])
        table["params"] = [params[name] for name in table["layer"]]
        tables.append(table)
    return Sensitivity(metric, float(base_quality[metric]), pd.concat(tables, ignore_index=True),
                       tuple(fmt.name for fmt in fmts))


@dataclass(frozen=True)
class Plan:
    """A format per linear under a budget, with what it is predicted to cost."""

    budget: Budget
    allocation: Allocation
    sensitivity: Sensitivity
    formats: dict  # format name -> QuantFormat
    kept_bytes: int  # embeddings, norms, head: stored as they are

    @property
    def total_bytes(self) -> int:
        return self.allocation.n_bytes + self.kept_bytes

    def predicted(self, base: float | None = None) -> float:
        """The predicted quality of the plan, from ``base`` (default: the sensitivity's full-precision value)."""
        return predicted_quality(self.sensitivity.metric, self.sensitivity.base if base is None else base,
                                 self.allocation.predicted_loss)

    def config(self, method: str = "rtn", calib: CalibConfig | None = None) -> QuantConfig:
        """The run of this plan: the commonest format as the default, every linear's own as an override."""
        if method not in MIXED_METHODS:
            raise FormatError(f"a plan runs with {' or '.join(MIXED_METHODS)}, not {method}")
        names = [option.fmt_name for _, option in self.allocation.choices]
        default = max(set(names), key=names.count)
        layer_formats = tuple((layer, self.formats[option.fmt_name]) for layer, option in self.allocation.choices)
        return QuantConfig(name=f"{method}-plan-{self.budget.label}", method=method, weight_format=self.formats[default],
                           layer_formats=layer_formats, calib=calib or CalibConfig())

    def table(self) -> pd.DataFrame:
        """One row per linear: its chosen format, bits per weight and predicted loss, and its loss in every candidate."""
        wide = self.sensitivity.table.pivot(index="layer", columns="format", values="loss")
        info = self.sensitivity.table.drop_duplicates("layer").set_index("layer")
        rows = []
        for layer, option in self.allocation.choices:
            params = int(info.loc[layer, "params"])
            rows.append({"layer": layer, "block": int(info.loc[layer, "block"]), "role": info.loc[layer, "role"],
                         "format": option.fmt_name, "bytes": option.n_bytes,
                         "params": params, "bits_per_weight": 8 * option.n_bytes / params,
                         "predicted_loss": option.loss,
                         **{f"loss_{name}": float(wide.loc[layer, name]) for name in self.sensitivity.candidates}})
        return pd.DataFrame(rows)


def predicted_quality(metric: str, base: float, loss: float) -> float:
    """Perplexity ``base x exp(KL)`` (see the module docstring), or fidelity ``base - drop``."""
    return base * math.exp(loss) if metric == "perplexity" else base - loss


def layer_choices(loaded, sensitivity: Sensitivity, fmts: dict) -> list[LayerChoices]:
    """Every linear with each candidate's exact bytes (``QuantFormat.storage``) and measured loss."""
    choices = []
    for info in loaded.structure.linears:
        options = tuple(LayerOption(name, fmt.storage(info.out_features, info.in_features).total_bytes,
                                    sensitivity.loss(info.name, name)) for name, fmt in fmts.items())
        choices.append(LayerChoices(info.name, info.out_features * info.in_features, options))
    return choices


def check_budget(loaded, fmts: Sequence[QuantFormat], budget: Budget) -> int:
    """The budget's bytes for the quantized linears; an error, before any measuring, when no plan can fit it."""
    linears = loaded.structure.linears
    kept = model_size(loaded.model, fmts[0]).full_precision_bytes
    budget_bytes = budget.quantized_bytes(sum(info.out_features * info.in_features for info in linears), kept)
    smallest = sum(min(fmt.storage(info.out_features, info.in_features).total_bytes for fmt in fmts) for info in linears)
    if smallest > budget_bytes:
        params = sum(info.out_features * info.in_features for info in linears)
        raise FormatError(f"budget {budget.label} is below the smallest plan these candidates allow "
                          f"({8 * smallest / params:.3f} bits per weight, {(smallest + kept) / 2**20:.3f} MiB: every "
                          "linear in its smallest format); raise the budget or add a smaller candidate")
    return budget_bytes


def make_plan(loaded, sensitivity: Sensitivity, budget: Budget) -> Plan:
    """The formats of least predicted loss whose bytes fit ``budget`` (bits per weight or MiB)."""
    fmts = {name: QuantFormat.parse(name) for name in sensitivity.candidates}
    choices = layer_choices(loaded, sensitivity, fmts)
    reference = model_size(loaded.model, next(iter(fmts.values())))  # for the kept layers' bytes
    budget_bytes = budget.quantized_bytes(sum(c.params for c in choices), reference.full_precision_bytes)
    return Plan(budget, allocate(choices, budget_bytes), sensitivity, fmts, reference.full_precision_bytes)


def run_plan(session: QuantSession, plan: Plan, method: str = "rtn", calib: CalibConfig | None = None,
             progress: Progress | None = None) -> RunResult:
    """The plan quantized through the pipeline and evaluated on the session's windows."""
    _, result = quantize_model(session.loaded, plan.config(method, calib), progress, session=session)
    return result


def run_uniform(session: QuantSession, fmt_names: Sequence[str], method: str = "rtn",
                calib: CalibConfig | None = None, progress: Progress | None = None) -> list[RunResult]:
    """Each format on every linear, on the same windows: what the plan is measured against."""
    results = []
    for i, name in enumerate(fmt_names):
        config = QuantConfig(method=method, weight_format=QuantFormat.parse(name), calib=calib or CalibConfig())
        step = None if progress is None else (lambda f, m, i=i: progress((i + f) / len(fmt_names), m))
        results.append(quantize_model(session.loaded, config, step, session=session)[1])
    return results


def comparison_table(plan: Plan, measured: RunResult, uniform: Sequence[RunResult], base: float) -> pd.DataFrame:
    """The plan and the uniform formats: bits per weight, MiB, predicted and measured quality, KL.

    ``base`` is the full-precision quality on the windows the runs were measured on; predictions
    scale it by the summed losses (measured on the sensitivity windows).
    """
    metric = plan.sensitivity.metric
    rows = [_comparison_row(measured, metric, plan.allocation.predicted_loss, base, "plan")]
    for run in uniform:
        loss = sum(plan.sensitivity.loss(layer.name, run.config.weight_format.name) for layer in run.layers)
        rows.append(_comparison_row(run, metric, loss, base, "uniform"))
    table = pd.DataFrame(rows)
    table["size_gap_pct"] = 100 * (table["total_bytes"] / measured.total_bytes - 1)
    return table


def _comparison_row(run: RunResult, metric: str, loss: float, base: float, kind: str) -> dict:
    row = {"config": run.config.name, "kind": kind, "bits_per_weight": run.bits_per_weight,
           "total_bytes": run.total_bytes, "size_mib": run.total_bytes / 2**20}
    if metric == "perplexity":
        row |= {"predicted_kl": loss, "measured_kl": run.quality.get("kl_divergence")}
    return row | {f"predicted_{metric}": predicted_quality(metric, base, loss), f"measured_{metric}": run.quality.get(metric),
                  "top1_agreement": run.quality.get("top1_agreement")}
