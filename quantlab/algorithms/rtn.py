"""Round-to-nearest: every weight to its nearest grid point, scales from the weights alone.

The baseline every calibration method is measured against. Data-free: the calibration inputs are
used only to measure the output error, never to choose anything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from quantlab.numerics.formats import QuantFormat
from quantlab.numerics.primitives import Quantized, choose_qparams, clipped_mask, quantize

if TYPE_CHECKING:
    from quantlab.recipe import LayerResult
    from quantlab.calibrate.runner import BlockContext


@dataclass(frozen=True)
class RTNResult:
    quantized: Quantized
    clipped_fraction: float  # share of weights outside the range (0 for min-max; >0 for percentile/MSE)


def rtn_quantize(W: torch.Tensor, fmt: QuantFormat) -> RTNResult:
    """Quantize an (out, in) weight with the format's own range method."""
    qparams = choose_qparams(W, fmt)
    clipped = clipped_mask(W, fmt, qparams).float().mean().item()
    return RTNResult(quantize(W, fmt, qparams), clipped)


def process_block(ctx: BlockContext) -> list[LayerResult]:
    """RTN on every linear of the block; the inputs only serve to measure the output error."""
    inputs = ctx.collect(keep_inputs=ctx.keep_inputs)
    results = []
    for local_name, module in ctx.linear_modules().items():
        start = time.perf_counter()
        W = ctx.weight(local_name)  # (out, in)
        result = rtn_quantize(W, ctx.weight_format(local_name))  # per-layer in a mixed plan
        results.append(ctx.finish_linear(
            local_name, result.quantized, inputs[local_name], seconds=time.perf_counter() - start,
            clipped_fraction=result.clipped_fraction,
        ))
    return results
