"""SmoothQuant (Xiao et al., 2022): move activation outliers into the weights, then W8A8.

A few input channels of a transformer's linears carry activations 10-100x larger than the rest,
always the same channels. A per-tensor (or even per-token) INT8 activation scale is set by them,
and every other channel is left with a handful of codes. Weights have no such outliers. Scaling
input channel j by

    s_j = max|X_j|^α / max|W_j|^(1-α)

(``X_j`` over the calibration tokens, ``W_j`` the j-th weight column of the linears that share the
input) divides the activation outliers by ``s`` and multiplies the weight columns by it: α = 0.5
balances the two, larger α pushes more of the difficulty into the weights. ``y = (X/s)(W·s)ᵀ`` is
unchanged before quantization; the division folds into the previous norm or linear where the
architecture allows, and is otherwise kept as ``QuantizedLinear.input_scale``, which computes the
very same numbers (see :mod:`quantlab.algorithms.scaling`).

Which linears are smoothed: those fed by a normalization (roles q/k/v, gate/up), as in the
reference. The outlier channels live in the residual stream that the norms read; the inputs of
o and down (attention context, an activation function's output) have none of that structure, and
on MiniLM smoothing ``output.dense`` with α = 0.5 makes its static INT8 error *worse* (the
weight columns' spread moves into the activations). Those linears are quantized W8A8 as is.

Search is separate from apply: ``compute_smoothing`` returns the scales as data; ``process_block``
folds them, quantizes the weights (per channel with the default W8 format) and attaches an
activation quantizer calibrated on the smoothed inputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from quantlab.algorithms.rtn import rtn_quantize
from quantlab.algorithms.scaling import (
    MIN_SCALE, ScaleGroup, finish_scaled_linear, fold_scales, scale_groups, shared_inputs,
)

SMOOTHED_ROLES = ("q", "k", "v", "qkv", "gate", "up")  # the linears a norm feeds (see above)

if TYPE_CHECKING:
    from quantlab.recipe import LayerResult
    from quantlab.calibrate.runner import BlockContext


@dataclass(frozen=True)
class Smoothing:
    """The smoothing scales of one group and the statistics they came from. Shapes (in,)."""

    group: ScaleGroup
    alpha: float
    scales: torch.Tensor  # s, fp32
    act_absmax: torch.Tensor  # max |X_j| before smoothing
    weight_absmax: torch.Tensor  # max |W_j| over the group's linears, before smoothing

    def summary(self) -> dict:
        smoothed = self.act_absmax / self.scales
        return {
            "group": self.group.name, "linears": list(self.group.linears), "folded": self.group.folded,
            "alpha": self.alpha, "scale_min": self.scales.min().item(), "scale_max": self.scales.max().item(),
            # max/median channel absmax: how far the outlier channels stand out, before and after
            "act_outlier_ratio_before": _outlier_ratio(self.act_absmax),
            "act_outlier_ratio_after": _outlier_ratio(smoothed),
            "weight_outlier_ratio_after": _outlier_ratio(self.weight_absmax * self.scales),
        }


def _outlier_ratio(channel_absmax: torch.Tensor) -> float:
    return (channel_absmax.max() / channel_absmax.median().clamp(min=1e-30)).item()


def compute_smoothing(group: ScaleGroup, act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> Smoothing:
    """``s_j = max|X_j|^α / max|W_j|^(1-α)`` for the linears of ``group`` (weights as (out, in)).

    Both maxima are clamped at ``MIN_SCALE`` first, as in the reference, so that a dead channel or
    an all-zero column gives a finite, positive scale.
    """
    weight_absmax = torch.stack([W.detach().abs().amax(dim=0).float() for W in weights]).amax(dim=0)  # (in,)
    act = act_absmax.float().clamp(min=MIN_SCALE)
    scales = (act.pow(alpha) / weight_absmax.clamp(min=MIN_SCALE).pow(1 - alpha)).clamp(min=MIN_SCALE)
    return Smoothing(group, alpha, scales, act_absmax.float(), weight_absmax)


def smooth_block(ctx: BlockContext, inputs: dict) -> list[Smoothing]:
    """Compute the smoothing of every norm-fed group and fold it into ``ctx.block``."""
    groups = scale_groups(ctx.block, ctx.spec, list(ctx.linears), shared_inputs(inputs))
    smoothings = []
    for group in groups:
        if any(ctx.linears[name].role not in SMOOTHED_ROLES for name in group.linears):
            continue
        weights = [ctx.weight(name) for name in group.linears]
        act_absmax = inputs[group.linears[0]].stats.absmax.to(weights[0].device)
        smoothing = compute_smoothing(group, act_absmax, weights, ctx.config.smooth_alpha)
        fold_scales(ctx.block, group, smoothing.scales)
        smoothings.append(smoothing)
    return smoothings


def process_block(ctx: BlockContext) -> list[LayerResult]:
    """Smooth the block, then quantize every linear with the weight format and ``config.act``."""
    start = time.perf_counter()
    inputs = ctx.collect(keep_inputs=ctx.needs_raw_inputs)
    smoothings = smooth_block(ctx, inputs)
    ctx.searches["smoothquant"] = [smoothing.summary() for smoothing in smoothings]
    search_seconds = (time.perf_counter() - start) / max(1, len(ctx.linears))
    smoothing_of = {name: smoothing for smoothing in smoothings for name in smoothing.group.linears}
    results = []
    for name in ctx.linears:  # block order
        start, smoothing = time.perf_counter(), smoothing_of.get(name)
        quantized = rtn_quantize(ctx.weight(name), ctx.config.weight_format)
        timing = {"seconds": search_seconds + time.perf_counter() - start, "clipped_fraction": quantized.clipped_fraction}
        if smoothing is None:
            results.append(ctx.finish_linear(name, quantized.quantized, inputs[name], extra={"smoothed": False}, **timing))
            continue
        results.append(finish_scaled_linear(
            ctx, name, quantized.quantized, inputs[name], smoothing.group, smoothing.scales, **timing,
            extra={"smoothed": True, "smooth_group": smoothing.group.name, "folded": smoothing.group.folded,
                   "alpha": smoothing.alpha},
        ))
    return results
