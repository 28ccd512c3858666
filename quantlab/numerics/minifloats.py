"""Tiny floating-point element types (E2M1, E2M3, E3M2, E4M3) and the scaled-block formats built on them.

A minifloat with ``e`` exponent bits, ``m`` mantissa bits and bias ``b`` (OCP Microscaling spec
v1.0; no infinities, and for FP4/FP6 no NaN) holds, for a biased exponent ``E`` and mantissa ``M``::

    E == 0:  M * 2^(1 - b - m)             (subnormals, spaced like the lowest binade)
    E >= 1:  (2^m + M) * 2^(E - b - m)

E2M1 (FP4) has eight magnitudes, 0, 0.5, 1, 1.5, 2, 3, 4, 6: a step of 0.5 below 2, 1 in [2, 4)
and 2 in [4, 6]. Rounding is to the nearest, ties to even (the even mantissa), so 2.5 -> 2,
3.5 -> 4, 5 -> 4 and 0.25 -> 0, and anything above 6 saturates at 6.

A *scaled-block* format (``BlockSpec``) stores one scale per block of ``group_size`` values along
a row (and ``tile_rows`` rows: 128 x 128 tiles for FP8 block), in one of three scale types:

    e8m0       a bare power of two 2^k, k in [-127, 127], one byte (OCP MX formats)
    fp8-e4m3   an FP8 scale per block times one fp32 scale per tensor (NVFP4's two levels)
    fp32       a plain fp32 scale (DeepSeek-style FP8 block quantization)

Torch only: it sits below ``formats`` inside the numerics package.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True)
class Minifloat:
    """One element type. ``torch_dtype`` is set where torch has it (E4M3): its cast rounds exactly."""

    name: str
    exp_bits: int
    man_bits: int
    bias: int
    max: float  # largest finite magnitude
    mx_round_bits: int  # mantissa width used to round a block's absmax to a power of two (see mx_exponent)
    torch_dtype: torch.dtype | None = None

    @property
    def n_bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number; subnormals share its step."""
        return 1 - self.bias

    @property
    def mx_offset(self) -> int:
        """floor(log2(max)): how far below the block's power-of-two absmax an MX scale sits."""
        return math.floor(math.log2(self.max))

    def magnitudes(self) -> tuple[float, ...]:
        """Every non-negative value, in code order (which is increasing): E2M1 gives the eight above."""
        out = []
        for code in range(2 ** (self.exp_bits + self.man_bits)):
            biased, mantissa = code >> self.man_bits, code & (2**self.man_bits - 1)
            if biased == 0:
                out.append(mantissa * 2.0 ** (self.emin - self.man_bits))
            else:
                out.append((2**self.man_bits + mantissa) * 2.0 ** (biased - self.bias - self.man_bits))
        return tuple(v for v in out if v <= self.max)  # E4M3's top pattern is NaN, not 480

    def grid(self) -> tuple[float, ...]:
        """Every value, negative ones included, ascending (one zero)."""
        mags = self.magnitudes()
        return tuple(-v for v in reversed(mags[1:])) + mags


# mx_round_bits follows compressed-tensors 0.20 (generate_mx_scales): the element's own mantissa
# width for FP4 and FP6 E2M3, and FP4's for FP8 (E4M3's 448 = 1.75 * 2^8 then never clips).
E2M1 = Minifloat("e2m1", 2, 1, 1, 6.0, 1)
E2M3 = Minifloat("e2m3", 2, 3, 1, 7.5, 3)
E3M2 = Minifloat("e3m2", 3, 2, 3, 28.0, 2)
E4M3 = Minifloat("e4m3", 4, 3, 7, 448.0, 1, torch.float8_e4m3fn)


@dataclass(frozen=True)
class BlockSpec:
    """A scaled-block format: element type, block shape and how the block's scale is stored."""

    kind: str
    element: Minifloat
    group_size: int  # consecutive values along a row that share one scale
    scale: str  # "e8m0" | "fp8-e4m3" | "fp32"
    tile_rows: int = 1  # rows that share it too: 128 for FP8 block's 128 x 128 tiles
    global_scale: bool = False  # one more fp32 scale for the whole tensor (NVFP4)
    summary: str = ""

    @property
    def scale_bits(self) -> int:
        return 32 if self.scale == "fp32" else 8

    @property
    def scale_torch_dtype(self) -> torch.dtype:
        return {"e8m0": torch.float8_e8m0fnu, "fp8-e4m3": torch.float8_e4m3fn, "fp32": torch.float32}[self.scale]

    def n_scales(self, out_features: int, in_features: int) -> int:
        """Block scales of an (out, in) weight; a last partial tile of rows still has its own scale."""
        return math.ceil(out_features / self.tile_rows) * (in_features // self.group_size)


BLOCK_SPECS = {
    spec.kind: spec
    for spec in (
        BlockSpec("mxfp4", E2M1, 32, "e8m0", summary="OCP MXFP4: E2M1 values, one power-of-two E8M0 scale per 32"),
        BlockSpec("mxfp6-e2m3", E2M3, 32, "e8m0", summary="OCP MXFP6 E2M3: one E8M0 scale per 32"),
        BlockSpec("mxfp6-e3m2", E3M2, 32, "e8m0", summary="OCP MXFP6 E3M2: wider range, fewer steps"),
        BlockSpec("mxfp8-e4m3", E4M3, 32, "e8m0", summary="OCP MXFP8 E4M3: one E8M0 scale per 32"),
        BlockSpec("nvfp4", E2M1, 16, "fp8-e4m3", global_scale=True,
                  summary="NVIDIA NVFP4: E2M1 values, an FP8 E4M3 scale per 16, an fp32 scale per tensor"),
        BlockSpec("fp8-block", E4M3, 128, "fp32", tile_rows=128,
                  summary="FP8 E4M3 with one fp32 scale per 128 x 128 weight tile"),
    )
}
# Short names people type for the OCP formats with one usual element type.
BLOCK_ALIASES = {"mxfp6": "mxfp6-e2m3", "mxfp8": "mxfp8-e4m3"}


def element_grid(x, scale, el_max: float, emin: int, man_bits: int) -> torch.Tensor:
    """Nearest element value of ``x / scale`` (ties to even), saturating at +-el_max; fp32, sign kept.

    The step between neighbours is 2^(e - m) for a value of binade e (clamped at the subnormal
    binade emin), so rounding is one division by a power of two: exact, then torch.round's
    half-to-even. A value at most ``el_max`` never rounds above it (``el_max`` ends its binade).
    The element comes as plain numbers so that kernels.run can fuse this with torch.compile.
    """
    scaled = x / scale
    mag = scaled.abs().clamp_(max=el_max)
    binade = ((mag.view(torch.int32) >> 23) & 0xFF) - 127  # the fp32 exponent field
    step = torch.exp2(binade.clamp_(min=emin).sub_(man_bits).float())
    return torch.copysign(torch.round(mag / step).mul_(step), scaled)


def round_to_element(x: torch.Tensor, element: Minifloat) -> torch.Tensor:
    """Nearest value of ``element`` for fp32 ``x``: E2M1 takes 2.5 -> 2, 3.5 -> 4, 7 -> 6."""
    if element.torch_dtype is not None:
        return x.float().clamp(-element.max, element.max).to(element.torch_dtype).float()
    return element_grid(x.float(), 1.0, element.max, element.emin, element.man_bits)


@lru_cache(maxsize=None)
def magnitude_table(element: Minifloat, device: torch.device) -> torch.Tensor:
    return torch.tensor(element.magnitudes(), device=device)


def element_codes(values: torch.Tensor, element: Minifloat) -> torch.Tensor:
    """uint8 bit patterns (sign, exponent, mantissa) of values already on the element grid."""
    table = magnitude_table(element, values.device)
    index = torch.searchsorted(table, values.abs().contiguous())  # exact: every magnitude is in the table
    sign = torch.signbit(values).to(torch.int64) << (element.exp_bits + element.man_bits)
    return (index | sign).to(torch.uint8)


def element_values(codes: torch.Tensor, element: Minifloat) -> torch.Tensor:
    """fp32 values of uint8 bit patterns (the inverse of ``element_codes``)."""
    width = element.exp_bits + element.man_bits
    as_int = codes.to(torch.int64)
    mag = magnitude_table(element, codes.device)[as_int & (2**width - 1)]
    return torch.where((as_int >> width) == 1, -mag, mag)


def mx_exponent(absmax: torch.Tensor, element: Minifloat) -> torch.Tensor:
    """The E8M0 exponent k (int32, clamped to [-127, 127]) of the scale 2^k of blocks with ``absmax``.

    As compressed-tensors 0.20 (after vLLM's reference MXFP4): round the absmax to a power of two,
    up when its mantissa is within half an element step of the next one (for E2M1: from 1.75 on),
    then step down by floor(log2(max)). E2M1 example: absmax 1.5 -> 2^0 -> k = -2, scale 0.25,
    absmax / scale = 6 (fits); absmax 1.7 -> k = -2 too, 1.7 / 0.25 = 6.8 clips to 6; absmax 1.8
    -> 2^1 -> k = -1, 1.8 / 0.5 = 3.6 rounds to 4 (no clip, but the top code 6 goes unused).
    """
    bits = absmax.float().contiguous().view(torch.int32)
    rounded = (bits + (1 << (22 - element.mx_round_bits))) & 0x7F800000  # keep sign-less exponent only
    return ((rounded >> 23) - 127 - element.mx_offset).clamp_(-127, 127)
