"""Per-input-channel scaling shared by AWQ and SmoothQuant: which linears share a scale, and the fold.

Both methods rewrite ``y = x Wᵀ`` as ``y = (x / s)(W · s)ᵀ`` with one ``s`` per input channel:
exact in real arithmetic, but it moves magnitude between the activations and the weight columns
before either is quantized. The division by ``s`` is free when it can be folded into the op that
produces ``x`` (a norm's weight and bias, or the output rows of a previous linear); the
architecture table (``ArchSpec.scale_pairs``) says where that is possible.

Where it is not (BERT is post-norm: each LayerNorm output is also the next residual, so dividing
the norm would change the residual stream; GQA's v -> o when the shapes differ; a linear after a
nonlinearity), the division is kept as ``QuantizedLinear.input_scale``: one per-channel multiply at run time, the
same numbers as a fold, so the simulated outputs are identical.

Worked example: ``ScaleGroup("input_layernorm", ("self_attn.q_proj", ...), folded=True)`` with
``s = [2, 0.5]`` halves the norm's first weight entry, doubles its second, and multiplies the first
column of q, k and v by 2 and the second by 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from quantlab.calibrate.activations import calibrated_quantizer
from quantlab.models.architectures import ArchSpec, is_linear, weight_matrix
from quantlab.models.quantized import input_transform_of
from quantlab.errors import QuantizationError
from quantlab.numerics.primitives import Quantized

if TYPE_CHECKING:
    from quantlab.recipe import LayerResult
    from quantlab.calibrate.runner import BlockContext
    from quantlab.calibrate.inputstats import LinearInputs

MIN_SCALE = 1e-4  # a channel that never fires would otherwise get s = 0 and a division by zero


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read the same input and so share one per-input-channel scale."""

    name: str  # the producing op when folded (e.g. "input_layernorm"), else the first linear's name
    linears: tuple[str, ...]  # names inside the block
    folded: bool  # True: 1/s folds into ``name``; False: kept as the linears' input_scale


def _foldable(block: nn.Module, prev: str, linears: tuple[str, ...], available: set[str]) -> bool:
    """All linears present, and a linear ``prev`` produces exactly their input width (not GQA's v->o)."""
    if not set(linears) <= available:
        return False
    if any(input_transform_of(block.get_submodule(name)) is not None for name in linears):
        return False  # the producer's output is rotated before it reaches them: a per-channel 1/s cannot pass
    try:
        prev_module = block.get_submodule(prev)
    except AttributeError:
        return False
    width = weight_matrix(block.get_submodule(linears[0])).shape[1]
    if is_linear(prev_module):
        return weight_matrix(prev_module).shape[0] == width
    weight = getattr(prev_module, "weight", None)
    return weight is not None and weight.shape == (width,)


def scale_groups(block: nn.Module, spec: ArchSpec, linear_names: list[str],
                 same_input: dict[str, str] | None = None) -> list[ScaleGroup]:
    """Every linear of the block in exactly one group: the table's foldable pairs first.

    ``same_input`` maps a linear to a representative of the linears fed by the very same tensor
    (from the calibration hooks); unfoldable linears that share an input share one group, so BERT's
    q/k/v get one input_scale, as a single per-channel multiply of their common input would.
    """
    available = set(linear_names)
    groups: list[ScaleGroup] = []
    for pair in spec.scale_pairs:
        if _foldable(block, pair.prev, pair.linears, available):
            groups.append(ScaleGroup(pair.prev, pair.linears, True))
            available -= set(pair.linears)
    same_input = same_input or {}
    by_input: dict[str, list[str]] = {}
    for name in linear_names:
        if name in available:
            by_input.setdefault(same_input.get(name, name), []).append(name)
    groups += [ScaleGroup(names[0], tuple(names), False) for names in by_input.values()]
    return groups


@torch.no_grad()
def fold_scales(block: nn.Module, group: ScaleGroup, scales: torch.Tensor) -> None:
    """Multiply the group's weight columns by ``scales`` and divide the producing op by them.

    In place on ``block`` (the runner's private working copy). For an unfolded group the caller
    keeps ``scales`` as the linears' ``input_scale``.
    """
    if not torch.isfinite(scales).all() or (scales <= 0).any():
        raise QuantizationError(f"scales of {group.name} must be finite and positive; check the calibration inputs")
    for name in group.linears:
        W = weight_matrix(block.get_submodule(name))  # (out, in), a view of the stored weight
        W.mul_(scales.to(W.dtype))
    if not group.folded:
        return
    prev = block.get_submodule(group.name)
    if is_linear(prev):
        weight_matrix(prev).div_(scales.to(prev.weight.dtype).unsqueeze(1))  # output rows
    else:
        prev.weight.div_(scales.to(prev.weight.dtype))
    bias = getattr(prev, "bias", None)
    if bias is not None:
        bias.div_(scales.to(bias.dtype))


def shared_inputs(inputs: dict[str, LinearInputs]) -> dict[str, str]:
    """Linear -> the first linear fed by the very same tensor (the recorder shares their entries)."""
    first: dict[int, str] = {}
    return {name: first.setdefault(id(value), name) for name, value in inputs.items()}


def finish_scaled_linear(ctx: BlockContext, name: str, quantized: Quantized, inputs: LinearInputs,
                         group: ScaleGroup, scales: torch.Tensor, *, seconds: float, clipped_fraction: float,
                         extra: dict) -> LayerResult:
    """Hand a linear quantized as ``Q(W·s)`` to the runner, measured against what it computes in fp.

    The reference is the working weight with the column scaling undone (``W·s / s``): that is the
    original weight, with the output rows divided by the next group's scales when they were folded
    into this linear (v -> o, up -> down), which is what the layer must now produce. The static
    activation scale is observed on the inputs the layer sees after smoothing, ``X / s``.
    """
    reference = ctx.weight(name) / scales  # (out, in)
    act_quantizer = None
    if ctx.config.act is not None:
        smoothed = [x / scales.to(x.dtype) for x in inputs.inputs] if inputs.inputs is not None else None
        act_quantizer = calibrated_quantizer(ctx.config.act, smoothed)
    return ctx.finish_linear(
        name, quantized, inputs, seconds=seconds, clipped_fraction=clipped_fraction, extra=extra,
        input_scale=None if group.folded else scales, effective_scale=scales if group.folded else None,
        reference_weight=reference, act_quantizer=act_quantizer,
    )
