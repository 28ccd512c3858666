"""Quantization primitives: choose scales, quantize, dequantize, fake-quantize. Torch only.

Every granularity goes through one code path: the tensor is viewed as blocks of shape
``(rows, groups, group_size)`` and one scale (and zero-point) is chosen per block::

    per-tensor   (1, 1, numel)
    per-channel  (out, 1, in)
    group g      (out, in / g, g)

Maths is done in fp32 whatever the input dtype (fp16's x/s overflows for small scales, bf16's
8-bit mantissa cannot hold round(x/s) exactly), and results are cast back to the input dtype.
Inputs are never modified. Scales are rounded to their storage dtype *before* the codes are
computed, so that what ``dequantize`` returns is exactly what a packed file would give. The
elementwise encode/decode runs through :mod:`quantlab.numerics.kernels` (one fused loop for large tensors).

Example (INT4 symmetric per-tensor on four values)::

    >>> fmt = QuantFormat.parse("int4-per-tensor")
    >>> fake_quantize(torch.tensor([0.0, 0.5, -1.0, 0.7]), fmt)
    tensor([ 0.0000,  0.5332, -1.0664,  0.6665])

absmax = 1.0 over (qmax - qmin) / 2 = 7.5 gives s = 0.13333, stored as fp16 0.13330; 0.5 / s = 3.75
rounds to 4, so 0.5 comes back as 4s = 0.5332, and -1.0 / s = -7.502 as -8s = -1.0664 (the full
range's 16th level); 0.7 / s = 5.25 gives 5s = 0.6665.

Idempotence: re-quantizing a dequantized tensor with the same qparams returns the same codes for
every format; with freshly chosen min-max qparams it does too for symmetric formats. Asymmetric
min-max is not idempotent in general: the rounded zero-point can leave the top code unused, so
the dequantized tensor spans a smaller range than the grid and a fresh scale comes out smaller.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from quantlab.numerics import kernels, microscaling
from quantlab.errors import FormatError, QuantizationError
from quantlab.numerics.formats import FP8_DTYPES, NF4_LEVELS, QuantFormat

MSE_CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(11))  # 1.00, 0.95, ..., 0.50
# Smallest positive scale per storage dtype: an all-zero block would otherwise divide by zero.
# fp16's smallest subnormal (2^-24) survives the cast; bf16 and fp32 share fp32's exponent range.
_MIN_SCALE = {torch.float16: 2.0**-24, torch.bfloat16: 1e-30, torch.float32: 1e-30}


@dataclass(frozen=True)
class QParams:
    """Scale (and zero-point) per block, shapes (rows, groups, 1)."""

    scale: torch.Tensor  # stored dtype of the format (fp16/bf16/fp32)
    zero_point: torch.Tensor | None  # int32 in [0, 2^b - 1]; None when symmetric
    clip_ratio: torch.Tensor  # fp32, the fraction of the min-max range kept (1 = no clipping)
    global_scale: torch.Tensor | None = None  # (1, 1, 1) fp32 second-level scale (NVFP4); None otherwise

    def working_scale(self) -> torch.Tensor:
        """The fp32 divisor the codes use: the stored scale, over the global scale when there is one."""
        scale = self.scale.float()
        return scale if self.global_scale is None else scale / self.global_scale


@dataclass(frozen=True)
class Quantized:
    """A quantized tensor: codes in the input's shape plus what is needed to dequantize them."""

    codes: torch.Tensor  # int8 (sym int), uint8 (asym int, NF4 index) or a float8 dtype
    qparams: QParams
    fmt: QuantFormat
    dtype: torch.dtype  # the input dtype, restored by dequantize


@dataclass(frozen=True)
class ErrorReport:
    """How a quantization went: what was clipped and what it cost."""

    clipped_fraction: float  # share of values outside the representable range (clamped)
    mse: float  # mean squared error over all values
    relative_error: float  # ||x - x_hat||^2 / ||x||^2
    clipping_mse: float  # the part of the MSE contributed by clipped values
    rounding_mse: float  # the part contributed by values inside the range


def to_blocks(x: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """View ``x`` as fp32 blocks (rows, groups, group_size). 1-D is one row; N-D rows are dim 0..N-2."""
    x2 = x.reshape(1, -1) if x.dim() <= 1 else x.reshape(-1, x.shape[-1])
    kind = fmt.granularity.kind
    if kind == "tensor":
        return x2.float().reshape(1, 1, -1)
    if kind == "channel":
        return x2.float().unsqueeze(1)
    fmt.granularity.check_divides(x2.shape[1])
    return x2.float().reshape(x2.shape[0], -1, fmt.granularity.group_size)


def _block_range(blocks: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """The (lo, hi) each block would use before any clipping search, each (rows, groups, 1).

    Raises QuantizationError on NaN or Inf anywhere in a block. Min-max reductions propagate
    them into lo/hi; quantiles can step over them, so that path checks the extremes as well.
    """
    # amin and amax as two reductions: one read each and no |x| temporary, 2-3x faster on CPU than
    # abs().amax() or aminmax (measured on 4096x4096); max(-min, max) is exactly the absmax.
    lo, hi = blocks.amin(dim=-1, keepdim=True), blocks.amax(dim=-1, keepdim=True)
    _check_finite(lo, hi)
    if fmt.range_method == "percentile" and fmt.percentile < 100:
        q = fmt.percentile / 100
        if fmt.symmetric:
            hi = _quantile(blocks.abs(), q)
            return -hi, hi
        tail = (1 - q) / 2
        return _quantile(blocks, tail), _quantile(blocks, 1 - tail)
    if fmt.symmetric:
        hi = torch.maximum(-lo, hi)
        return -hi, hi
    return lo, hi


def _quantile(blocks: torch.Tensor, q: float) -> torch.Tensor:
    # kthvalue rather than torch.quantile: the latter refuses inputs over 16M elements.
    n = blocks.shape[-1]
    k = min(n, max(1, round(q * n)))
    return blocks.kthvalue(k, dim=-1, keepdim=True).values


def _qparams_from_range(
    lo: torch.Tensor, hi: torch.Tensor, fmt: QuantFormat
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (rounded to its storage dtype, returned in fp32) and zero-point for a range.

    Symmetric formats get ranges (-hi, hi) from ``_block_range`` (and the MSE search keeps that),
    so their absmax is ``hi``.
    """
    if fmt.kind == "int" and not fmt.symmetric:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)  # the range must contain 0 exactly
        scale = (hi - lo) / (2**fmt.n_bits - 1)
    else:
        scale = hi / _grid_max(fmt)
    stored = scale.to(fmt.torch_scale_dtype).clamp(min=_MIN_SCALE[fmt.torch_scale_dtype]).float()
    if stored.amax().item() == float("inf"):  # scales are >= 0: overflow to +inf is the only way to fail
        raise QuantizationError(
            f"a scale of {scale.amax().item():.4g} overflows {fmt.scale_dtype}; "
            "store scales in bf16 or fp32 (--scale-dtype bf16) for values this large"
        )
    scale = stored
    if not fmt.has_zero_point:
        return scale, None
    zero_point = torch.round(-lo / scale).clamp(0, 2**fmt.n_bits - 1).to(torch.int32)
    return scale, zero_point


def _grid_max(fmt: QuantFormat) -> float:
    """What absmax maps to: (qmax - qmin) / 2 for symmetric ints (7.5 at INT4 full range, as
    compressed-tensors), the largest finite float8, 1 for NF4."""
    if fmt.kind == "int":
        return fmt.symmetric_divisor
    if fmt.kind == "nf4":
        return 1.0
    if fmt.is_block_scaled:
        return microscaling.spec_of(fmt).element.max
    return float(torch.finfo(FP8_DTYPES[fmt.kind]).max)


def _check_finite(lo: torch.Tensor, hi: torch.Tensor) -> None:
    """Raise QuantizationError if a block's min (lo) or max (hi) is NaN or infinite."""
    # One comparison covers both ends (few small ops matter on a busy CPU): hi - lo >= 0 is below
    # +inf unless an end is NaN or infinite, or a finite range overflows fp32 (then the scale
    # check of an asymmetric format reports it; a symmetric one does not need hi - lo).
    if ((hi - lo) < float("inf")).all():
        return
    bad = ~(torch.isfinite(lo) & torch.isfinite(hi))  # (rows, groups, 1)
    if not bad.any():
        return
    rows = bad.flatten(1).any(dim=1).nonzero().flatten()
    raise QuantizationError(
        f"tensor has NaN or Inf values in {bad.sum().item()} block(s) (first rows: {rows[:5].tolist()}); "
        "fix or drop those weights before quantizing"
    )


def choose_qparams(x: torch.Tensor, fmt: QuantFormat) -> QParams:
    """Pick the scale (and zero-point) of every block with the format's range method."""
    return _qparams_of_blocks(to_blocks(x, fmt), fmt)[0]


def _qparams_of_blocks(blocks: torch.Tensor, fmt: QuantFormat) -> tuple[QParams, torch.Tensor]:
    """``choose_qparams`` on fp32 blocks (rows, groups, g); also the scale as fp32, ready to use."""
    if fmt.is_block_scaled:
        stored, working, global_scale = microscaling.choose_block_scales(blocks, fmt)
        return QParams(stored, None, torch.ones_like(working), global_scale), working
    lo, hi = _block_range(blocks, fmt)
    if fmt.range_method == "mse":
        ratio = _mse_search(blocks, lo, hi, fmt)
        lo, hi = lo * ratio, hi * ratio
    else:
        ratio = torch.ones_like(lo)
    scale, zero_point = _qparams_from_range(lo, hi, fmt)
    return QParams(scale.to(fmt.torch_scale_dtype), zero_point, ratio), scale


def _mse_search(blocks: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Per block, the clip ratio in MSE_CLIP_RATIOS with the least squared error."""
    best_err = torch.full_like(lo, float("inf"))
    best_ratio = torch.ones_like(lo)
    for ratio in MSE_CLIP_RATIOS:
        scale, zero_point = _qparams_from_range(lo * ratio, hi * ratio, fmt)
        err = _fake_blocks(blocks, scale, zero_point, fmt).sub_(blocks).square_().sum(dim=-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(lo, ratio), best_ratio)
    return best_ratio


@lru_cache(maxsize=None)
def _nf4_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 levels and the midpoints between neighbours (the rounding boundaries), fp32, read-only by use."""
    levels = torch.tensor(NF4_LEVELS, device=device)
    return levels, (levels[1:] + levels[:-1]) / 2


def _encode(blocks: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, fmt: QuantFormat):
    """Codes for fp32 blocks with fp32 scale: ints as integer-valued fp32, NF4 as int32 index, FP8 as float8."""
    if fmt.is_block_scaled:
        return microscaling.encode(blocks, scale, fmt)
    if fmt.kind == "int":
        return kernels.run(kernels.int_codes, blocks, scale, zero_point, fmt.qmin, fmt.qmax)
    if fmt.kind == "nf4":
        midpoints = _nf4_tables(blocks.device)[1]
        return kernels.run(kernels.nf4_codes, blocks, scale, midpoints, fused=kernels.nf4_codes_select)
    return kernels.run(kernels.fp8_codes, blocks, scale, _grid_max(fmt), FP8_DTYPES[fmt.kind])


def _decode(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, fmt: QuantFormat):
    """fp32 values of stored codes (int8/uint8 ints, uint8 NF4 indices or float8)."""
    if fmt.is_block_scaled:
        return microscaling.decode(codes, scale, fmt)
    if fmt.kind == "int":
        return kernels.int_values(codes.float(), scale, zero_point)
    if fmt.kind == "nf4":
        return kernels.nf4_values(codes.int(), scale, _nf4_tables(codes.device)[0])
    return codes.float().mul_(scale)


def _fake_blocks(blocks, scale, zero_point, fmt) -> torch.Tensor:
    """decode(encode(blocks)) in one fused kernel where that pays (see quantlab.numerics.kernels)."""
    if fmt.is_block_scaled:
        return microscaling.fake(blocks, scale, fmt)
    if fmt.kind == "int":
        return kernels.run(kernels.fake_int, blocks, scale, zero_point, fmt.qmin, fmt.qmax)
    if fmt.kind == "nf4":
        levels, midpoints = _nf4_tables(blocks.device)
        return kernels.run(kernels.fake_nf4, blocks, scale, midpoints, levels, fused=kernels.fake_nf4_select)
    return kernels.run(kernels.fake_fp8, blocks, scale, _grid_max(fmt), FP8_DTYPES[fmt.kind])


def quantize(x: torch.Tensor, fmt: QuantFormat, qparams: QParams | None = None) -> Quantized:
    """Quantize ``x`` to codes; ``qparams`` defaults to ``choose_qparams(x, fmt)``.

    With given ``qparams``, out-of-range values (Inf included) clamp to the grid's ends, but NaN
    has no code and raises QuantizationError (``fake_quantize`` lets NaN through instead).
    """
    blocks = to_blocks(x, fmt)
    if qparams is None:
        qparams, scale = _qparams_of_blocks(blocks, fmt)
    elif torch.isnan(blocks).any():
        raise QuantizationError("tensor has NaN values, which have no code; fix or drop them before quantizing")
    else:
        scale = qparams.working_scale()
    codes = _encode(blocks, scale, qparams.zero_point, fmt)
    if fmt.kind == "int":
        codes = codes.to(torch.int8 if fmt.symmetric else torch.uint8)
    elif fmt.kind == "nf4":
        codes = codes.to(torch.uint8)
    return Quantized(codes.reshape(x.shape), qparams, fmt, x.dtype)


def dequantize(qt: Quantized) -> torch.Tensor:
    """Values on the grid, in the original dtype and shape."""
    codes = to_blocks_codes(qt)
    values = _decode(codes, qt.qparams.working_scale(), qt.qparams.zero_point, qt.fmt)
    return values.reshape(qt.codes.shape).to(qt.dtype)


def to_blocks_codes(qt: Quantized) -> torch.Tensor:
    """The codes in block shape (rows, groups, g), without the fp32 cast ``to_blocks`` does."""
    codes = qt.codes.reshape(1, -1) if qt.codes.dim() <= 1 else qt.codes.reshape(-1, qt.codes.shape[-1])
    gran = qt.fmt.granularity
    if gran.kind == "tensor":
        return codes.reshape(1, 1, -1)
    if gran.kind == "channel":
        return codes.unsqueeze(1)
    return codes.reshape(codes.shape[0], -1, gran.group_size)


def fake_quantize(x: torch.Tensor, fmt: QuantFormat, qparams: QParams | None = None) -> torch.Tensor:
    """Quantize then dequantize: same shape and dtype as ``x``, values on the format's grid.

    Equal, bit for bit, to ``dequantize(quantize(x, fmt, qparams))`` for finite ``x``. With given ``qparams``,
    NaN stays NaN and out-of-range values (Inf included) clamp to the grid's ends.
    """
    blocks = to_blocks(x, fmt)  # fp32: a copy for fp16/bf16 input, made once for both steps
    qparams, scale = _qparams_of_blocks(blocks, fmt) if qparams is None else (qparams, qparams.working_scale())
    out = _fake_blocks(blocks, scale, qparams.zero_point, fmt)
    return out.reshape(x.shape).to(x.dtype)


def clipped_mask(x: torch.Tensor, fmt: QuantFormat, qparams: QParams) -> torch.Tensor:
    """True where the clamp to the representable range was active, in ``x``'s shape."""
    blocks = to_blocks(x, fmt)
    scaled = blocks / qparams.working_scale()
    if fmt.kind == "int":
        shifted = torch.round(scaled) + (qparams.zero_point if qparams.zero_point is not None else 0)
        mask = (shifted < fmt.qmin) | (shifted > fmt.qmax)
    else:
        mask = scaled.abs() > _grid_max(fmt)
    return mask.reshape(x.shape)


def error_report(x: torch.Tensor, fmt: QuantFormat, qparams: QParams | None = None) -> ErrorReport:
    """Clipped fraction and the error split into its clipping and rounding parts."""
    qparams = qparams or choose_qparams(x, fmt)
    xf = x.float()
    # Squares are taken relative to the peak |x|: those of denormal weights (< 1e-38) underflow to 0
    # in fp32, which would report no error at all; the peak's square is applied back in float64.
    peak = xf.abs().amax().clamp_min(torch.finfo(torch.float32).tiny) if x.numel() else xf.new_ones(())
    sq_err = ((fake_quantize(x, fmt, qparams).float() - xf) / peak).pow(2)
    mask = clipped_mask(x, fmt, qparams)
    n = max(1, x.numel())
    peak_sq = peak.item() ** 2
    total = sq_err.sum().item()
    clip = sq_err[mask].sum().item()
    return ErrorReport(
        clipped_fraction=mask.sum().item() / n,
        mse=total * peak_sq / n,
        relative_error=total / max((xf / peak).pow(2).sum().item(), 1e-30),
        clipping_mse=clip * peak_sq / n,
        rounding_mse=(total - clip) * peak_sq / n,
    )


def check_format_fits(shape: tuple[int, ...], fmt: QuantFormat) -> None:
    """Raise FormatError if ``fmt`` cannot quantize a tensor of ``shape`` (e.g. indivisible groups)."""
    if len(shape) == 0 or 0 in shape:
        raise FormatError(f"cannot quantize an empty tensor of shape {tuple(shape)}")
    fmt.granularity.check_divides(shape[-1])
