"""Real storage of quantized weights: codes bit-packed at their width, scales, packed zero-points.

Dense packing, least significant bits first: code ``i`` of an ``n``-bit stream occupies bits
``[i*n, (i+1)*n)``, and byte ``j`` holds stream bits ``[8j, 8j+8)``. So 4-bit codes go two per
byte (the first in the low nibble), 8-bit codes are the bytes themselves, and 2/3/5/6/7-bit
codes take exactly ``ceil(numel * n / 8)`` bytes with no padding between codes. Eight codes of
``n`` bits fill exactly ``n`` bytes, so packing works on groups of eight codes at once.

Worked example, 3-bit codes ``[5, 2, 7]``: the stream holds ``5 + 2*8 + 7*64 = 469`` in its
9 bits, which take two bytes, ``469 % 256 = 213`` and ``469 // 256 = 1``:
``pack(tensor([5, 2, 7]), 3) == tensor([213, 1], dtype=torch.uint8)``.

``pack_int32`` writes the 32-bit-word layout of GPTQ and compressed-tensors checkpoints (for
widths that divide 32): ``32 / n`` codes per word along the last dimension, lowest bits first.

Signed symmetric integer codes are stored offset by ``2^(n-1)`` (``to_unsigned``), as
compressed-tensors does: full-range codes lie in ``[0, 2^n - 1]``, restricted-range ones in ``[1, 2^n - 1]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from quantlab.errors import FormatError
from quantlab.numerics.formats import FP8_DTYPES, QuantFormat
from quantlab.numerics.minifloats import BLOCK_SPECS
from quantlab.numerics.primitives import QParams, Quantized

PACK_WIDTHS = tuple(range(2, 9))
INT32_WIDTHS = (2, 4, 8)


def _check_width(n_bits: int, widths: tuple[int, ...]) -> None:
    if n_bits not in widths:
        raise FormatError(f"cannot pack {n_bits}-bit codes; widths supported here are {list(widths)}")


def _check_codes(codes: torch.Tensor, n_bits: int) -> None:
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise FormatError(f"pack takes integer codes, got {codes.dtype}; use to_unsigned(codes, fmt) first")
    if not codes.numel():
        return
    low, high = int(codes.min()), int(codes.max())  # Python ints: 2**8 does not fit a uint8 comparison
    if low < 0 or high >= 2**n_bits:
        raise FormatError(
            f"codes must lie in [0, {2**n_bits - 1}] to pack at {n_bits} bits, got [{low}, {high}]; "
            "offset signed codes with to_unsigned"
        )


def packed_nbytes(numel: int, n_bits: int) -> int:
    return math.ceil(numel * n_bits / 8)


def pack(codes: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Unsigned codes in [0, 2^n_bits) of any shape -> uint8 1-D of ``ceil(numel * n_bits / 8)`` bytes."""
    _check_width(n_bits, PACK_WIDTHS)
    _check_codes(codes, n_bits)
    flat = codes.reshape(-1)
    if n_bits == 8:
        return flat.to(torch.uint8)
    n_groups = math.ceil(flat.numel() / 8)
    padded = torch.zeros(n_groups * 8, dtype=torch.int64, device=flat.device)
    padded[: flat.numel()] = flat
    # int64 holds a group of eight codes (at most 7 * 8 = 56 bits) without reaching the sign bit.
    shifts = torch.arange(8, device=flat.device) * n_bits
    words = (padded.reshape(n_groups, 8) << shifts).sum(dim=1, keepdim=True)  # (groups, 1)
    byte_shifts = torch.arange(n_bits, device=flat.device) * 8
    packed = ((words >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)  # (groups * n_bits,)
    return packed[: packed_nbytes(flat.numel(), n_bits)]


def unpack(packed: torch.Tensor, n_bits: int, numel: int) -> torch.Tensor:
    """The inverse of ``pack``: uint8 codes, 1-D of length ``numel``."""
    _check_width(n_bits, PACK_WIDTHS)
    expected = packed_nbytes(numel, n_bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
        raise FormatError(
            f"{numel} codes of {n_bits} bits take {expected} uint8 bytes, got {packed.numel()} "
            f"{packed.dtype} values of shape {tuple(packed.shape)}; was it packed with another width or size?"
        )
    if n_bits == 8:
        return packed.clone()
    n_groups = math.ceil(numel / 8)
    padded = torch.zeros(n_groups * n_bits, dtype=torch.int64, device=packed.device)
    padded[:expected] = packed
    byte_shifts = torch.arange(n_bits, device=packed.device) * 8
    words = (padded.reshape(n_groups, n_bits) << byte_shifts).sum(dim=1, keepdim=True)  # (groups, 1)
    shifts = torch.arange(8, device=packed.device) * n_bits
    codes = ((words >> shifts) & (2**n_bits - 1)).to(torch.uint8).reshape(-1)
    return codes[:numel]


def pack_int32(codes: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Unsigned codes (..., cols) -> int32 words (..., ceil(cols / (32 / n_bits))), lowest bits first.

    The last word of a row is zero-padded, as compressed-tensors' ``pack_to_int32`` does.
    """
    _check_width(n_bits, INT32_WIDTHS)
    _check_codes(codes, n_bits)
    per_word = 32 // n_bits
    cols = codes.shape[-1]
    n_words = math.ceil(cols / per_word)
    padded = torch.zeros(*codes.shape[:-1], n_words * per_word, dtype=torch.int64, device=codes.device)
    padded[..., :cols] = codes
    shifts = torch.arange(per_word, device=codes.device) * n_bits
    words = (padded.reshape(*codes.shape[:-1], n_words, per_word) << shifts).sum(dim=-1)
    # Words at or above 2^31 are negative int32s with the same bits: subtract 2^32 before the
    # cast, because the int64 -> int32 conversion of out-of-range values is not defined.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int32(words: torch.Tensor, n_bits: int, cols: int) -> torch.Tensor:
    """The inverse of ``pack_int32``: uint8 codes (..., cols)."""
    _check_width(n_bits, INT32_WIDTHS)
    per_word = 32 // n_bits
    if words.dtype != torch.int32 or words.shape[-1] != math.ceil(cols / per_word):
        raise FormatError(
            f"{cols} columns of {n_bits}-bit codes take {math.ceil(cols / per_word)} int32 words per row, "
            f"got {words.shape[-1]} {words.dtype} values"
        )
    shifts = torch.arange(per_word, device=words.device) * n_bits
    unsigned = words.to(torch.int64) & 0xFFFFFFFF  # (..., n_words)
    codes = (unsigned.unsqueeze(-1) >> shifts) & (2**n_bits - 1)  # (..., n_words, per_word)
    return codes.reshape(*words.shape[:-1], -1)[..., :cols].to(torch.uint8)


def to_unsigned(codes: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """``quantize``'s codes as uint8 ready to pack: symmetric ints offset by 2^(n_bits-1), asymmetric
    ints and NF4 indices as they are, FP8 as the bytes of its float8 values."""
    if fmt.kind in FP8_DTYPES or codes.dtype.is_floating_point:  # FP8, MXFP8 and FP8 block: their bytes
        return codes.view(torch.uint8)
    if fmt.kind == "int" and fmt.symmetric:
        return (codes.to(torch.int16) + 2 ** (fmt.n_bits - 1)).to(torch.uint8)
    return codes.to(torch.uint8)


def from_unsigned(codes: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """The inverse of ``to_unsigned``: int8 (symmetric ints), uint8 (asymmetric ints, NF4) or float8."""
    if fmt.kind in FP8_DTYPES:
        return codes.view(FP8_DTYPES[fmt.kind])
    if fmt.is_block_scaled and BLOCK_SPECS[fmt.kind].element.torch_dtype is not None:
        return codes.view(BLOCK_SPECS[fmt.kind].element.torch_dtype)
    if fmt.kind == "int" and fmt.symmetric:
        return (codes.to(torch.int16) - 2 ** (fmt.n_bits - 1)).to(torch.int8)
    return codes.to(torch.uint8)


@dataclass(frozen=True)
class PackedWeight:
    """A quantized weight as it is stored: what ``fmt.storage(rows, cols)`` counts, byte for byte.

    The clip ratio of the range search is not stored (it is not needed to dequantize).
    """

    codes: torch.Tensor  # uint8 1-D, ceil(numel * n_bits / 8) bytes (FP8: its float8 bytes)
    scale: torch.Tensor  # (rows, groups) in the format's scale dtype; (row tiles, groups) for FP8 block
    zero_point: torch.Tensor | None  # uint8 1-D, zero-points packed at n_bits; None when symmetric
    shape: tuple[int, ...]  # of the original weight
    fmt: QuantFormat
    dtype: torch.dtype = torch.float32  # the original weight's dtype, restored on dequantize
    global_scale: torch.Tensor | None = None  # (1,) fp32: NVFP4's per-tensor scale

    def __post_init__(self) -> None:
        numel = math.prod(self.shape)
        if self.codes.dtype != torch.uint8 or self.codes.numel() != packed_nbytes(numel, self.fmt.n_bits):
            raise FormatError(
                f"packed codes of a {self.shape} {self.fmt.name} weight must be "
                f"{packed_nbytes(numel, self.fmt.n_bits)} uint8 bytes, got {self.codes.numel()} {self.codes.dtype}"
            )
        if (self.zero_point is None) == self.fmt.has_zero_point:
            raise FormatError(f"{self.fmt.name} {'needs' if self.fmt.has_zero_point else 'has no'} zero-points")

    @property
    def nbytes(self) -> int:
        tensors = [t for t in (self.codes, self.scale, self.zero_point, self.global_scale) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors to save with safetensors: ``{prefix}.weight_packed``, ``.weight_scale`` and, when
        asymmetric, ``.weight_zero_point``. Shape and format go in the file's metadata."""
        tensors = {f"{prefix}.weight_packed": self.codes, f"{prefix}.weight_scale": self.scale}
        if self.zero_point is not None:
            tensors[f"{prefix}.weight_zero_point"] = self.zero_point
        if self.global_scale is not None:
            tensors[f"{prefix}.weight_global_scale"] = self.global_scale
        return {name: t.contiguous() for name, t in tensors.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str, shape: tuple[int, ...],
                     fmt: QuantFormat, dtype: torch.dtype = torch.float32) -> PackedWeight:
        """The inverse of ``to_tensors`` given the shape and format kept in the metadata."""
        zero_point = tensors.get(f"{prefix}.weight_zero_point")
        return cls(tensors[f"{prefix}.weight_packed"], tensors[f"{prefix}.weight_scale"], zero_point,
                   tuple(shape), fmt, dtype, tensors.get(f"{prefix}.weight_global_scale"))


def pack_quantized(qt: Quantized) -> PackedWeight:
    """Pack the codes and zero-points of ``quantize``'s output at the format's width."""
    fmt, qparams = qt.fmt, qt.qparams
    codes = pack(to_unsigned(qt.codes, fmt), fmt.n_bits)
    scale = qparams.scale.to(fmt.torch_scale_dtype).reshape(qparams.scale.shape[0], -1)  # (rows, groups)
    zero_point = None if qparams.zero_point is None else pack(qparams.zero_point, fmt.n_bits)
    global_scale = None if qparams.global_scale is None else qparams.global_scale.reshape(1)
    if fmt.is_block_scaled:
        scale = scale[:: BLOCK_SPECS[fmt.kind].tile_rows]  # one scale per tile: (row tiles, groups)
    return PackedWeight(codes, scale, zero_point, tuple(qt.codes.shape), fmt, qt.dtype, global_scale)


def unpack_to_quantized(pw: PackedWeight) -> Quantized:
    """The ``Quantized`` that ``pack_quantized`` packed; ``dequantize`` gives the same values."""
    fmt = pw.fmt
    codes = from_unsigned(unpack(pw.codes, fmt.n_bits, math.prod(pw.shape)), fmt).reshape(pw.shape)
    scale = pw.scale.reshape(*pw.scale.shape, 1)  # (rows, groups, 1)
    if fmt.is_block_scaled and BLOCK_SPECS[fmt.kind].tile_rows > 1:
        rows = codes.reshape(-1, codes.shape[-1]).shape[0]
        scale = scale.repeat_interleave(BLOCK_SPECS[fmt.kind].tile_rows, dim=0)[:rows]
    zero_point = None
    if pw.zero_point is not None:
        zero_point = unpack(pw.zero_point, fmt.n_bits, scale.numel()).to(torch.int32).reshape(scale.shape)
    # NaN: the clip ratio of the search that chose these scales is unknown after a round trip.
    clip_ratio = torch.full(scale.shape, float("nan"), device=scale.device)
    global_scale = None if pw.global_scale is None else pw.global_scale.reshape(1, 1, 1)
    return Quantized(codes, QParams(scale, zero_point, clip_ratio, global_scale), fmt, pw.dtype)
