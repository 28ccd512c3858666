"""Scaled-block formats (MXFP4/6/8, NVFP4, FP8 block) on the primitives' one block path.

The tensor is viewed as blocks (rows, groups, group_size), as every other format (see
:mod:`quantlab.numerics.primitives`); each block gets one scale from its absmax, stored in the
format's scale type (:class:`~quantlab.numerics.minifloats.BlockSpec`), and values are rounded to
the element grid after dividing by the *working* scale, the fp32 number the stored scale stands for:

    MX (e8m0)    working = 2^k, k from the block's absmax (``mx_exponent``)
    NVFP4        working = fp8(absmax / 6 * G) / G, G = 448 * 6 / absmax(tensor) in fp32
    FP8 block    working = absmax(tile) / 448, the tile being 128 rows x 128 columns

NVFP4's second level is data, not a code path: the per-tensor ``G`` travels with the stored fp8
scales (``QParams.global_scale``) and only enters through the working scale. FP8 block's tiles are
groups of 128 columns whose scale is shared by 128 rows: the scale of each (row, group) block is its
tile's, so encoding is the group-128 code path unchanged and only the scale choice sees the tile.

Worked example, MXFP4 on one block of 32 values with absmax 3.3: 3.3 = 1.65 * 2^1 rounds down to
the power of two 2 (1.65 < 1.75), so k = 1 - 2 = -1 and the scale is 0.5; 3.3 / 0.5 = 6.6 clips
to 6 (3.0 comes back), while a value 1.1 gives 2.2, rounds to 2 and comes back as 1.0.

All of it matches compressed-tensors 0.20's ``calculate_qparams`` + ``quantize`` / ``dequantize``
bit for bit on fp32 weights (tests/test_microscaling.py); maths is fp32 as everywhere in QuantLab.
"""

from __future__ import annotations

import torch

from quantlab.errors import QuantizationError
from quantlab.numerics import kernels
from quantlab.numerics.formats import QuantFormat
from quantlab.numerics.minifloats import (
    BLOCK_SPECS, BlockSpec, element_codes, element_grid, element_values, mx_exponent,
)

FP8_E4M3_MAX = 448.0
# compressed-tensors replaces a zero scale by its scale dtype's eps: 0.125 for fp8, fp32's eps else.
_ZERO_SCALE = {"fp8-e4m3": 0.125, "fp32": torch.finfo(torch.float32).eps}


def spec_of(fmt: QuantFormat) -> BlockSpec:
    return BLOCK_SPECS[fmt.kind]


def choose_block_scales(blocks: torch.Tensor, fmt: QuantFormat):
    """(stored, working, global_scale) for fp32 blocks (rows, groups, g).

    ``stored`` is in the scale's own dtype (float8_e8m0fnu, float8_e4m3fn or fp32), ``working`` the
    fp32 divisor the codes use, both (rows, groups, 1); ``global_scale`` is (1, 1, 1) fp32 or None.
    """
    spec = spec_of(fmt)
    absmax = _tile_absmax(_block_absmax(blocks), spec.tile_rows)  # (rows, groups, 1)
    if spec.scale == "e8m0":
        working = _pow2(mx_exponent(absmax, spec.element))
        return working.to(torch.float8_e8m0fnu), working, None
    if spec.scale == "fp32":
        working = absmax / spec.element.max
        working = torch.where(working == 0, _ZERO_SCALE["fp32"], working)
        return working, working, None
    global_scale = nvfp4_global_scale(absmax.amax()).reshape(1, 1, 1)
    local = (absmax / spec.element.max) * global_scale  # this order, as compressed-tensors
    stored = local.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    stored = torch.where(stored.float() == 0, _ZERO_SCALE["fp8-e4m3"], stored.float()).to(torch.float8_e4m3fn)
    return stored, stored.float() / global_scale, global_scale


def nvfp4_global_scale(tensor_absmax: torch.Tensor) -> torch.Tensor:
    """G = 448 * 6 / absmax in fp32, so the largest block's fp8 scale lands on fp8's top (448).

    An all-zero tensor would give G = inf: it falls back to 1, as compressed-tensors'
    ``generate_gparam`` does.
    """
    absmax = tensor_absmax.float().clamp(min=torch.finfo(torch.float32).tiny)
    global_scale = FP8_E4M3_MAX * 6.0 / absmax
    return torch.nan_to_num(global_scale, nan=1.0, posinf=1.0, neginf=1.0)


def _block_absmax(blocks: torch.Tensor) -> torch.Tensor:
    lo, hi = blocks.amin(dim=-1, keepdim=True), blocks.amax(dim=-1, keepdim=True)
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        bad = ~(torch.isfinite(lo) & torch.isfinite(hi))
        raise QuantizationError(
            f"tensor has NaN or Inf values in {bad.sum().item()} block(s); fix or drop those weights before quantizing"
        )
    return torch.maximum(-lo, hi)


def _tile_absmax(absmax: torch.Tensor, tile_rows: int) -> torch.Tensor:
    """Each block's absmax replaced by its tile's (max over ``tile_rows`` consecutive rows)."""
    if tile_rows == 1:
        return absmax
    rows = absmax.shape[0]
    pad = (-rows) % tile_rows  # a partial last tile: padding with zeros leaves its absmax as it is
    padded = torch.cat([absmax, absmax.new_zeros(pad, *absmax.shape[1:])]) if pad else absmax
    tiles = padded.reshape(-1, tile_rows, *absmax.shape[1:]).amax(dim=1)  # (tiles, groups, 1)
    return tiles.repeat_interleave(tile_rows, dim=0)[:rows]


def _pow2(k: torch.Tensor) -> torch.Tensor:
    """2^k exactly as fp32 for int32 k in [-127, 127], built from its bits (2^-127 is subnormal)."""
    normal = ((k + 127).clamp(min=0) << 23).view(torch.float32)
    return torch.where(k >= -126, normal, torch.full_like(normal, 2.0**-127))


def fake_element(blocks, scale, el_max: float, emin: int, man_bits: int) -> torch.Tensor:
    return element_grid(blocks, scale, el_max, emin, man_bits).mul_(scale)


def _element_args(spec: BlockSpec) -> tuple[float, int, int]:
    el = spec.element
    return el.max, el.emin, el.man_bits


def encode(blocks: torch.Tensor, scale: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Codes of fp32 blocks with the fp32 working scale: float8 values, or uint8 FP4/FP6 bit patterns."""
    spec = spec_of(fmt)
    el = spec.element
    if el.torch_dtype is not None:
        return kernels.run(kernels.fp8_codes, blocks, scale, el.max, el.torch_dtype)
    return element_codes(kernels.run(element_grid, blocks, scale, *_element_args(spec)), el)


def decode(codes: torch.Tensor, scale: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """fp32 values of stored codes (block shape) times the working scale."""
    el = spec_of(fmt).element
    values = codes.float() if el.torch_dtype is not None else element_values(codes, el)
    return values.mul_(scale)


def fake(blocks: torch.Tensor, scale: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """decode(encode(blocks)) without the codes."""
    spec = spec_of(fmt)
    el = spec.element
    if el.torch_dtype is not None:
        return kernels.run(kernels.fake_fp8, blocks, scale, el.max, el.torch_dtype)
    return kernels.run(fake_element, blocks, scale, *_element_args(spec))
