"""Quantization runs as tables: sweeps, the Pareto front, per-layer errors, sensitivity, generations.

The runs themselves come from :mod:`quantlab.runs.pipeline` (``RunResult``) or from a record file
(:mod:`quantlab.runs.records`); here they become DataFrames that plot and download as they are.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from quantlab.recipe import RunResult
from quantlab.models.architectures import describe, find_linears, weight_matrix
from quantlab.errors import DataError
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
        "seconds": run.seconds,
    } for run in runs]
    table = pd.DataFrame(rows)
    table["pareto"] = pareto_front(table, "bits_per_weight", metric, lower_is_better(metric))
    return table


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
