"""Outliers: which input and output channels of weights and activations stand out, and by how much.

A channel's magnitude is its largest |value| (absmax): that is what sets a shared scale. An
outlier's size is its ratio to the median channel of the same layer: a ratio of 20 means a
per-tensor scale leaves the typical channel with 1/20 of the codes. Activation statistics come
from a calibration pass (``calibration.collect_activation_stats``), weights need no model run, so
the weight views work on a bare safetensors file too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from quantlab.algorithms.awq import awq_scales
from quantlab.recipe import CalibConfig
from quantlab.algorithms.scaling import ScaleGroup
from quantlab.algorithms.smoothquant import compute_smoothing
from quantlab.analysis.tensors import NamedMatrix
from quantlab.calibrate.runner import calibration_set, collect_activation_stats
from quantlab.errors import FormatError
from quantlab.calibrate.inputstats import ActivationStats

AXES = ("input", "output")
PROTECT_SHARE = 0.01  # AWQ's paper: protecting ~1% of the salient channels recovers most of the loss
SMOOTH_ALPHA = 0.5  # SmoothQuant's default migration strength
AWQ_ALPHA = 0.5  # a typical searched alpha; the real one is searched per layer by the algorithm


def weight_channels(W: torch.Tensor, axis: str) -> torch.Tensor:
    """Absmax per input channel (column, shape (in,)) or per output channel (row, shape (out,))."""
    if axis not in AXES:
        raise FormatError(f"axis must be 'input' or 'output', got {axis!r}")
    magnitudes = W.detach().float().abs()  # (out, in)
    return magnitudes.amax(dim=0) if axis == "input" else magnitudes.amax(dim=1)


def activation_stats(loaded, calib: CalibConfig, progress=None) -> dict[str, ActivationStats]:
    """Per-input-channel statistics of every linear over a calibration set (the model is not modified)."""
    calib_ids = calibration_set(loaded.tokenizer, calib)
    return collect_activation_stats(loaded.model, calib_ids, progress=progress, structure=loaded.structure)


def channel_vectors(matrices: Sequence[NamedMatrix], axis: str, stats: dict[str, ActivationStats] | None = None,
                    ) -> dict[str, np.ndarray]:
    """Layer name -> per-channel magnitudes: weights (either axis) or, with ``stats``, activation absmax."""
    if stats is not None:
        return {m.name: stats[m.name].absmax.float().numpy() for m in matrices if m.name in stats}
    return {m.name: weight_channels(m.weight, axis).numpy() for m in matrices}


def heatmap_matrix(vectors: dict[str, np.ndarray]) -> tuple[np.ndarray, list[str]]:
    """Stack per-layer channel vectors into (layers, channels), padding shorter layers with NaN."""
    if not vectors:
        raise FormatError("no layers to show; choose another role or model")
    width = max(len(v) for v in vectors.values())
    z = np.full((len(vectors), width), np.nan)
    for i, v in enumerate(vectors.values()):
        z[i, : len(v)] = v
    return z, list(vectors)


def top_outliers(vectors: dict[str, np.ndarray], k: int = 20, source: str = "weight") -> pd.DataFrame:
    """The ``k`` channels with the largest ratio to their layer's median channel, over all layers."""
    rows = []
    for name, v in vectors.items():
        median = float(np.median(v)) or 1e-30
        for channel in np.argsort(v)[::-1][:k]:
            rows.append({"layer": name, "source": source, "channel": int(channel), "value": float(v[channel]),
                         "ratio_to_median": float(v[channel]) / median})
    columns = ["layer", "source", "channel", "value", "ratio_to_median"]
    table = pd.DataFrame(rows, columns=columns)
    return table.sort_values("ratio_to_median", ascending=False).head(k).reset_index(drop=True)


def excess_kurtosis(values: torch.Tensor) -> float:
    """E[(x - mean)^4] / var^2 - 3: 0 for a Gaussian, large when a few values dominate (outliers)."""
    x = values.detach().double().reshape(-1)
    centered = x - x.mean()
    var = centered.pow(2).mean()
    return float(centered.pow(4).mean() / var.pow(2) - 3) if var > 0 else 0.0


def kurtosis_table(matrices: Sequence[NamedMatrix], stats: dict[str, ActivationStats] | None = None) -> pd.DataFrame:
    """Per layer: excess kurtosis of its weights, and of its input channels' absmax when ``stats`` exist."""
    rows = []
    for m in matrices:
        row = {"layer": m.name, "block": m.block, "role": m.role, "weight_kurtosis": excess_kurtosis(m.weight)}
        if stats is not None and m.name in stats:
            row["activation_channel_kurtosis"] = excess_kurtosis(stats[m.name].absmax)
        rows.append(row)
    return pd.DataFrame(rows)


def protected_channels(matrix: NamedMatrix, stats: ActivationStats,
                       share: float = PROTECT_SHARE) -> dict[str, list[int]]:
    """Input channels AWQ would scale up most and SmoothQuant would divide most, for one linear.

    AWQ: the largest ``mean|x|^α`` scales (salient by activation). SmoothQuant: the largest
    ``max|X_j|^α / max|W_j|^(1-α)`` factors, i.e. the activation outliers it migrates into the weights.
    """
    n = max(1, round(share * stats.absmax.numel()))
    awq = awq_scales(stats.mean_abs, AWQ_ALPHA)
    group = ScaleGroup(matrix.name, (matrix.name,), False)
    smooth = compute_smoothing(group, stats.absmax, [matrix.weight], SMOOTH_ALPHA).scales
    return {"awq": sorted(awq.topk(n).indices.tolist()), "smoothquant": sorted(smooth.topk(n).indices.tolist())}


def layer_channels(matrix: NamedMatrix, axis: str, stats: ActivationStats | None = None) -> pd.DataFrame:
    """One layer's channels: weight magnitude and, for input channels with stats, activation absmax and mean."""
    weights = weight_channels(matrix.weight, axis).numpy()
    table = pd.DataFrame({"channel": np.arange(len(weights)), "weight_absmax": weights})
    if stats is not None and axis == "input":
        table["activation_absmax"] = stats.absmax.float().numpy()
        table["activation_mean_abs"] = stats.mean_abs.float().numpy()
        marked = protected_channels(matrix, stats)
        table["awq_protects"] = table["channel"].isin(marked["awq"])
        table["smoothquant_migrates"] = table["channel"].isin(marked["smoothquant"])
    return table
