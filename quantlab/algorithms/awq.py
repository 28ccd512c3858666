"""AWQ (Lin et al., 2023): activation-aware per-channel scales, then a weight-clipping search.

Weights that multiply large activations matter most. AWQ scales input channel j of a group of
linears by ``s_j = mean|x_j|^α`` (normalised so that max·min = 1) before quantizing, which gives
the salient columns a finer grid, and divides the input by ``s`` (folded into the op before the
linears where the architecture table allows, see :mod:`quantlab.algorithms.scaling`). The
exponent α is searched on a grid ``i / n_grid`` in [0, 1): α = 0 is plain round-to-nearest, so the
search can only improve on RTN on the calibration tokens. Then each quantization block's clipping
ratio (1.0 down to ``1 - max_shrink``) is searched to minimise that block's share of the output.

What the search minimises: the sum over the group's linears of their relative output error
``||X Wᵀ - X Ŵᵀ||² / ||X Wᵀ||²`` on the calibration inputs, with ``Ŵ = Q(W·s)/s``, computed as
``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` from the H = 2XᵀX/n the runner accumulates anyway: every
calibration token counts, at a cost of (out · in²) per evaluation and no stored activations.
The reference measures the output of the parent module instead (the whole attention for q/k/v,
the MLP for gate/up), which also weighs how errors travel through the softmax and the gated
product; the linears' own outputs need no attention masks or position embeddings and are the
quantity the issue asks for. Like the reference, the clip search skips q and k, whose errors are
read through the softmax of qkᵀ, where a per-linear output error is a poor proxy.

Search is separate from apply: ``search_scales`` and ``search_clip`` return data
(``ScaleSearch``, ``ClipSearch``); ``process_block`` folds, clips and quantizes with them and puts
the search results in every ``LayerResult.extra``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from quantlab.numerics.measures import output_error
from quantlab.algorithms.rtn import rtn_quantize
from quantlab.algorithms.scaling import (
    MIN_SCALE, ScaleGroup, finish_scaled_linear, fold_scales, scale_groups, shared_inputs,
)
from quantlab.numerics.formats import QuantFormat
from quantlab.numerics.primitives import Quantized, fake_quantize, to_blocks

if TYPE_CHECKING:
    from quantlab.recipe import AWQParams, LayerResult
    from quantlab.calibrate.runner import BlockContext

log = logging.getLogger(__name__)

CLIP_SKIP_ROLES = ("q", "k")  # read through softmax(qkᵀ): see the module docstring


@dataclass(frozen=True)
class ScaleSearch:
    """The alpha search of one group: the grid, the losses and the chosen scales."""

    group: ScaleGroup
    alphas: tuple[float, ...]
    losses: dict[str, tuple[float, ...]]  # linear -> relative output error at each alpha
    best_alpha: float
    scales: torch.Tensor  # (in,) fp32, the chosen s

    @property
    def total_losses(self) -> tuple[float, ...]:
        return tuple(map(sum, zip(*self.losses.values())))

    def summary(self) -> dict:
        total = self.total_losses
        return {
            "group": self.group.name, "linears": list(self.group.linears), "folded": self.group.folded,
            "alpha": self.best_alpha, "alphas": list(self.alphas), "losses": {k: list(v) for k, v in self.losses.items()},
            "loss_rtn": total[0], "loss_best": min(total),
            "scale_min": self.scales.min().item(), "scale_max": self.scales.max().item(),
            "scale_mean": self.scales.mean().item(),
        }


@dataclass(frozen=True)
class ClipSearch:
    """Per-block clipping ratios of one (already scaled) weight and what they bought."""

    ratios: torch.Tensor  # (rows, groups, 1) in the format's block shape, fraction of the range kept
    loss_before: float  # relative output error with ratio 1 everywhere
    loss_after: float

    def summary(self) -> dict:
        return {"clip_mean": self.ratios.mean().item(), "clip_min": self.ratios.min().item(),
                "clip_loss_before": self.loss_before, "clip_loss_after": self.loss_after}


def awq_scales(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """``mean|x|^α``, normalised so that max·min = 1 (the reference's choice: s stays near 1)."""
    s = mean_abs.float().clamp(min=MIN_SCALE).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def search_scales(group: ScaleGroup, mean_abs: torch.Tensor, hessian: torch.Tensor,
                  weights: dict[str, torch.Tensor], fmt: QuantFormat, n_grid: int) -> ScaleSearch:
    """The alpha in ``i / n_grid`` whose scales give the group the least summed relative error.

    ``mean_abs`` (in,) and ``hessian`` (in, in, any multiple of XᵀX) describe the group's inputs
    as the linears see them now; ``weights`` are the linears' (out, in) matrices. Nothing is
    modified.
    """
    alphas = tuple(i / n_grid for i in range(n_grid))
    weights = {name: W.float() for name, W in weights.items()}
    # output_error's denominator tr(W H Wᵀ) does not depend on alpha: computed once, not per point.
    reference = {name: ((W @ hessian) * W).sum().clamp(min=1e-30) for name, W in weights.items()}
    losses: dict[str, list[float]] = {name: [] for name in weights}
    for alpha in alphas:
        s = awq_scales(mean_abs, alpha)  # (in,)
        for name, W in weights.items():
            delta = W - fake_quantize(W * s, fmt) / s  # (out, in), as applied to the unscaled X
            losses[name].append((((delta @ hessian) * delta).sum() / reference[name]).item())
    total = [sum(values) for values in zip(*losses.values())]
    best = min(range(n_grid), key=total.__getitem__)
    return ScaleSearch(group, alphas, {k: tuple(v) for k, v in losses.items()}, alphas[best],
                       awq_scales(mean_abs, alphas[best]))


def _clip_range(W: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 blocks (rows, groups, g) of ``W`` and the (lo, hi) range the grid would cover, per block."""
    blocks = to_blocks(W, fmt)
    hi = blocks.amax(dim=-1, keepdim=True)
    lo = blocks.amin(dim=-1, keepdim=True)
    if fmt.symmetric:
        hi = torch.maximum(hi.abs(), lo.abs())
        lo = -hi
    return blocks, lo, hi


def _clamp(blocks: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, ratios: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.minimum(torch.maximum(blocks, lo * ratios), hi * ratios).reshape(like.shape).to(like.dtype)


def clip_weight(W: torch.Tensor, fmt: QuantFormat, ratios: torch.Tensor) -> torch.Tensor:
    """``W`` clamped, block by block, to ``ratios`` (rows, groups, 1) of its min-max range."""
    return _clamp(*_clip_range(W, fmt), ratios, W)


def _diagonal_blocks(hessian: torch.Tensor, group: int) -> torch.Tensor:
    """The (G, g, g) diagonal blocks of an (in, in) matrix: each group's inputs with themselves."""
    n_groups = hessian.shape[0] // group
    return hessian.reshape(n_groups, group, n_groups, group).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def _block_output_error(delta: torch.Tensor, h_blocks: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Each block's output error ||X_g ΔW_gᵀ||² = ΔW_g H_gg ΔW_gᵀ, in the format's block shape."""
    n_groups, group = h_blocks.shape[0], h_blocks.shape[1]
    dW = delta.reshape(delta.shape[0], n_groups, group)  # (out, G, g)
    err = torch.einsum("ogk,gkl,ogl->og", dW, h_blocks, dW).unsqueeze(-1)  # (out, G, 1)
    return err.sum().reshape(1, 1, 1) if fmt.granularity.kind == "tensor" else err


def search_clip(W: torch.Tensor, hessian: torch.Tensor, fmt: QuantFormat, params: AWQParams) -> ClipSearch:
    """Per block, the ratio in 1, 1 - 1/clip_grid, ... >= 1 - max_shrink with the least output error.

    As in the reference, each block is judged by its own share of the output (its partial dot
    products over the calibration tokens), computed from the diagonal blocks of ``hessian``.
    """
    fmt = replace(fmt, range_method="minmax")  # the clamp sets the range; no second search on top
    W = W.float()
    group = fmt.granularity.group_size if fmt.granularity.kind == "group" else W.shape[1]
    h_blocks = _diagonal_blocks(hessian, group)  # (G, g, g)
    n_ratios = math.floor(params.clip_grid * params.max_shrink + 1e-9) + 1  # eps: 0.7 * 20 = 13.999...
    blocks, lo, hi = _clip_range(W, fmt)
    ones = torch.ones_like(lo)  # (rows, groups, 1)
    best_ratio, best_err = ones, _block_output_error(fake_quantize(W, fmt) - W, h_blocks, fmt)
    for i in range(1, n_ratios):
        ratios = ones * (1 - i / params.clip_grid)
        err = _block_output_error(fake_quantize(_clamp(blocks, lo, hi, ratios, W), fmt) - W, h_blocks, fmt)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, ratios, best_ratio)
    before = output_error(W, fake_quantize(W, fmt), hessian)
    after = output_error(W, fake_quantize(clip_weight(W, fmt, best_ratio), fmt), hessian)
    return ClipSearch(best_ratio, before, after)


def scaled_hessian(hessian: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """H of the inputs ``X / s``: diag(1/s) H diag(1/s)."""
    inv = 1.0 / scales.float()
    return hessian * inv.unsqueeze(1) * inv.unsqueeze(0)


def search_block_scales(ctx: BlockContext, inputs: dict) -> list[ScaleSearch]:
    """Search every group's alpha in block order, folding each result before the next search."""
    groups = scale_groups(ctx.block, ctx.spec, list(ctx.linears), shared_inputs(inputs))
    searches = []
    for group in groups:
        seen = inputs[group.linears[0]]  # H and statistics over every calibration token
        weights = {name: ctx.weight(name) for name in group.linears}
        mean_abs = seen.stats.mean_abs.to(seen.hessian.device)
        search = search_scales(group, mean_abs, seen.hessian, weights, ctx.config.weight_format, ctx.config.awq.n_grid)
        fold_scales(ctx.block, group, search.scales)
        searches.append(search)
        log.debug("AWQ %s.%s: alpha %.2f, loss %.3g -> %.3g", ctx.prefix, group.name, search.best_alpha,
                  search.total_losses[0], min(search.total_losses))
    return searches


def _clip_and_quantize(ctx: BlockContext, name: str, hessian: torch.Tensor) -> tuple[Quantized, float, dict]:
    """Clip search (unless off, or q/k), then RTN of the scaled weight: (codes, clipped share, data).

    ``hessian`` is that of the inputs the scaled layer sees, X / s.
    """
    W = ctx.weight(name)  # (out, in), already multiplied by s
    fmt = ctx.config.weight_format
    if not ctx.config.awq.clip_search or ctx.linears[name].role in CLIP_SKIP_ROLES:
        result = rtn_quantize(W, fmt)
        return result.quantized, result.clipped_fraction, {}
    clip = search_clip(W, hessian, fmt, ctx.config.awq)
    clipped = clip_weight(W, fmt, clip.ratios)
    fmt = replace(fmt, range_method="minmax")  # the searched clamp replaces the format's own range choice
    return rtn_quantize(clipped, fmt).quantized, (clipped != W).float().mean().item(), clip.summary()


def process_block(ctx: BlockContext) -> list[LayerResult]:
    """AWQ on one block: search and fold the scales, search the clipping, quantize every linear.

    The losses come from each input's H = 2XᵀX/n (``output_error``), so every calibration token
    counts and the raw inputs are kept only when static activation scales need them.
    """
    start = time.perf_counter()
    inputs = ctx.collect(keep_inputs=ctx.needs_raw_inputs)
    searches = search_block_scales(ctx, inputs)
    search_of = {name: search for search in searches for name in search.group.linears}
    search_seconds = (time.perf_counter() - start) / max(1, len(ctx.linears))
    results, clips = [], {}
    for name in ctx.linears:  # block order
        start, search = time.perf_counter(), search_of[name]
        hessian = scaled_hessian(inputs[name].hessian, search.scales)
        quantized, clipped_fraction, clips[name] = _clip_and_quantize(ctx, name, hessian)
        extra = {"awq_group": search.group.name, "folded": search.group.folded, "alpha": search.best_alpha,
                 **clips[name]}
        results.append(finish_scaled_linear(
            ctx, name, quantized, inputs[name], search.group, search.scales,
            seconds=search_seconds + time.perf_counter() - start, clipped_fraction=clipped_fraction, extra=extra,
        ))
    ctx.searches["awq"] = {"scales": [search.summary() for search in searches], "clip": clips}
    return results
