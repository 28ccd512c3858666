"""Quantization formats: what a number format is, and how many bytes it costs.

A format is a frozen dataclass: the number system (integer, FP8, NF4), the bit width, symmetric or
asymmetric, the granularity at which scales are shared, the dtype the scales are stored in and the
way the clipping range is chosen. Everything else in QuantLab takes a ``QuantFormat``.

Worked example, INT4 with groups of 128, fp16 scales and 4-bit zero-points::

    >>> fmt = QuantFormat.parse("int4-g128-asym")
    >>> round(fmt.bits_per_weight(in_features=4096), 3)
    4.156

That is 4 bits per weight plus one 16-bit scale and one 4-bit zero-point per 128 weights.

Symmetric integers use the *full* signed range [-2^(b-1), 2^(b-1)-1] (e.g. [-8, 7] at 4 bits) with
compressed-tensors' scale rule ``scale = absmax / ((qmax - qmin) / 2)`` (absmax / 7.5 at 4 bits,
absmax / 127.5 at 8), as compressed-tensors, llm-compressor, GPTQ and torchao quantize: -absmax maps
to -7.5, which rounds (half to even) to -8, and +absmax to 7.5, which clamps to 7, so the largest
positive value is clipped by half a step in exchange for a step 7% finer than absmax / 7 (INT4).
``symmetric_range="restricted"`` (names ending ``-restricted``) keeps the older convention
[-(2^(b-1)-1), 2^(b-1)-1] with ``scale = absmax / qmax``: 15 of the 16 INT4 levels, a grid symmetric
about zero, and nothing clipped by min-max calibration. Both ranges' codes fit the signed range
compressed-tensors stores, so exports of either load anywhere. (fp16 scales below 6.1e-5 lose bits,
so the rounded scale may clip the absmax of tiny weights; bf16 scales avoid that.)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

import torch

from quantlab.errors import FormatError
from quantlab.numerics.minifloats import BLOCK_ALIASES, BLOCK_SPECS

SCALE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FP8_DTYPES = {"fp8-e4m3": torch.float8_e4m3fn, "fp8-e5m2": torch.float8_e5m2}
# Scaled-block kinds (mxfp4, nvfp4, fp8-block, ...) fix their element type, block and scale type:
# see quantlab.numerics.minifloats and quantlab.numerics.microscaling.
KINDS = ("int", "fp8-e4m3", "fp8-e5m2", "nf4") + tuple(BLOCK_SPECS)
RANGE_METHODS = ("minmax", "percentile", "mse")
SYMMETRIC_RANGES = ("full", "restricted")


@dataclass(frozen=True)
class Granularity:
    """Which values share one scale.

    ``tensor``: the whole tensor; ``channel``: each output row (dim 0); ``group``: runs of
    ``group_size`` consecutive values along the input dimension (the last one) of each row.
    """

    kind: str = "channel"  # "tensor" | "channel" | "group"
    group_size: int = 0  # only for "group"; must divide the input dimension

    def __post_init__(self) -> None:
        if self.kind not in ("tensor", "channel", "group"):
            raise FormatError(f"granularity must be tensor, channel or group, got {self.kind!r}")
        if self.kind == "group" and self.group_size < 1:
            raise FormatError(f"group size must be a positive integer, got {self.group_size}")
        if self.kind != "group" and self.group_size != 0:
            raise FormatError(f"group_size is only meaningful for group granularity, not {self.kind}")

    @classmethod
    def from_group_size(cls, group_size: int) -> Granularity:
        """The CLI convention: ``0`` per-channel, ``-1`` per-tensor, ``N > 0`` groups of N."""
        if group_size == 0:
            return cls("channel")
        if group_size == -1:
            return cls("tensor")
        if group_size > 0:
            return cls("group", group_size)
        raise FormatError(f"group size {group_size} is invalid: use a positive size, 0 (per-channel) or -1 (per-tensor)")

    @property
    def label(self) -> str:
        return f"g{self.group_size}" if self.kind == "group" else {"tensor": "per-tensor", "channel": "per-channel"}[self.kind]

    def groups_per_row(self, in_features: int) -> int:
        return in_features // self.group_size if self.kind == "group" else 1

    def check_divides(self, in_features: int) -> None:
        """Raise a FormatError that lists the valid group sizes when this one does not fit."""
        if self.kind != "group":
            return
        if self.group_size > in_features or in_features % self.group_size:
            raise FormatError(
                f"group size {self.group_size} does not divide the input dimension {in_features}; "
                f"use one of {valid_group_sizes(in_features)} or per-channel (0)"
            )


def valid_group_sizes(in_features: int) -> list[int]:
    """Power-of-two group sizes from 16 that divide ``in_features`` (the ones kernels support)."""
    sizes = [g for g in (16, 32, 64, 128, 256, 512, 1024) if g <= in_features and in_features % g == 0]
    return sizes or [d for d in range(2, min(in_features, 1024) + 1) if in_features % d == 0][:8]


# The 16 levels of NormalFloat4 (Dettmers et al., QLoRA 2023): quantiles of N(0, 1) scaled to
# [-1, 1], with an exact zero. Values as published in bitsandbytes.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


@dataclass(frozen=True)
class QuantFormat:
    """One quantization format. Validated on construction; ``parse`` reads names like ``int4-g128``."""

    kind: str = "int"  # "int" | "fp8-e4m3" | "fp8-e5m2" | "nf4" | a scaled-block kind (BLOCK_SPECS)
    n_bits: int = 8  # integer width 2..8; fixed at 8 for FP8 and 4 for NF4
    symmetric: bool = True  # asymmetric adds an integer zero-point per scale (ints only)
    granularity: Granularity = field(default_factory=Granularity)
    scale_dtype: str = "fp16"  # how scales are stored; quantization uses the stored (rounded) scale
    range_method: str = "minmax"  # "minmax" | "percentile" | "mse"
    percentile: float = 99.9  # for "percentile": the share of |x| kept inside the range, in (0, 100]
    # Symmetric ints only: "full" [-2^(b-1), 2^(b-1)-1] as the deployed tools, or "restricted" [-(2^(b-1)-1), ...].
    symmetric_range: str = "full"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise FormatError(f"unknown format {self.kind!r}; use int2..int8, fp8-e4m3, fp8-e5m2, nf4, "
                              f"{', '.join(BLOCK_SPECS)}")
        if self.is_block_scaled:
            self._check_block_scaled()
            return
        expected = {"nf4": 4, "fp8-e4m3": 8, "fp8-e5m2": 8}.get(self.kind)
        if expected is not None and self.n_bits != expected:
            raise FormatError(f"{self.kind} has {expected} bits, not {self.n_bits}")
        if self.kind == "int" and not 2 <= self.n_bits <= 8:
            raise FormatError(f"integer bits must be between 2 and 8, got {self.n_bits}")
        if self.kind != "int" and not self.symmetric:
            raise FormatError(f"{self.kind} is symmetric by construction; drop --asym")
        if self.kind == "nf4" and self.granularity.kind == "tensor":
            raise FormatError("nf4 uses per-group or per-channel absmax scales, not per-tensor")
        if self.scale_dtype not in SCALE_DTYPES:
            raise FormatError(f"scale dtype must be one of {sorted(SCALE_DTYPES)}, got {self.scale_dtype!r}")
        if self.range_method not in RANGE_METHODS:
            raise FormatError(f"range method must be one of {RANGE_METHODS}, got {self.range_method!r}")
        if not 0 < self.percentile <= 100:
            raise FormatError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.symmetric_range not in SYMMETRIC_RANGES:
            raise FormatError(f"symmetric range must be one of {SYMMETRIC_RANGES}, got {self.symmetric_range!r}")
        if self.restricted and not (self.kind == "int" and self.symmetric):
            raise FormatError("the restricted range applies to symmetric integers only; drop -restricted")

    def _check_block_scaled(self) -> None:
        """A scaled-block kind admits exactly its own element width, block, scale type and min-max scales."""
        spec = BLOCK_SPECS[self.kind]
        expected = {"n_bits": spec.element.n_bits, "symmetric": True, "granularity": Granularity("group", spec.group_size),
                    "scale_dtype": spec.scale, "range_method": "minmax"}
        for name, value in expected.items():
            if getattr(self, name) != value:
                raise FormatError(f"{self.kind} fixes {name} to {value!r}, got {getattr(self, name)!r}; "
                                  f"use QuantFormat.parse({self.kind!r})")

    @property
    def is_block_scaled(self) -> bool:
        """MX, NVFP4 and FP8-block formats: minifloat elements with one stored scale per block."""
        return self.kind in BLOCK_SPECS

    # --- integer grid -------------------------------------------------------------------
    @property
    def qmin(self) -> int:
        if self.kind != "int":
            raise FormatError(f"{self.kind} has no integer grid")
        if not self.symmetric:
            return 0
        return -(2 ** (self.n_bits - 1)) + (1 if self.restricted else 0)

    @property
    def qmax(self) -> int:
        if self.kind != "int":
            raise FormatError(f"{self.kind} has no integer grid")
        return 2 ** (self.n_bits - 1) - 1 if self.symmetric else 2**self.n_bits - 1

    @property
    def restricted(self) -> bool:
        return self.symmetric_range == "restricted"

    @property
    def symmetric_divisor(self) -> float:
        """What absmax is divided by to give a symmetric int scale: (qmax - qmin) / 2, as compressed-tensors.

        7.5 for INT4 full range (absmax lands on -7.5, rounded to -8, and +7.5, clamped to 7); for the
        restricted range (qmax - qmin) / 2 = qmax = 7, and +-absmax land exactly on +-7.
        """
        return (self.qmax - self.qmin) / 2

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return BLOCK_SPECS[self.kind].scale_torch_dtype if self.is_block_scaled else SCALE_DTYPES[self.scale_dtype]

    @property
    def has_zero_point(self) -> bool:
        return self.kind == "int" and not self.symmetric

    # --- names --------------------------------------------------------------------------
    @property
    def name(self) -> str:
        if self.is_block_scaled:
            return self.kind  # the block is part of the format (mxfp4: 32, nvfp4: 16)
        base = f"int{self.n_bits}" if self.kind == "int" else self.kind
        parts = [base, self.granularity.label]
        if self.has_zero_point:
            parts.append("asym")
        if self.restricted:
            parts.append("restricted")
        return "-".join(parts)

    @classmethod
    def parse(cls, text: str, **overrides) -> QuantFormat:
        """Read ``int4``, ``int4-g128``, ``int8-per-channel``, ``int3-g64-asym``, ``fp8-e4m3``, ``nf4-g64``.

        ``-restricted`` after a symmetric integer format (``int4-g128-restricted``) selects the
        restricted range [-(2^(b-1)-1), 2^(b-1)-1]; without it symmetric integers use the full range.

        Without a granularity, integers and FP8 default to per-channel and NF4 to groups of 64.
        Keyword ``overrides`` (e.g. ``scale_dtype="fp32"``) replace fields afterwards.
        """
        match = re.fullmatch(
            # ASCII digits, bounded: \d also takes other scripts' digits, and int() refuses 4300+ of them.
            r"(int(?P<bits>[0-9]{1,3})|(?P<kind>fp8-e4m3|fp8-e5m2|nf4|fp8-block|nvfp4|mxfp[468](-e[0-9]m[0-9])?))"
            r"(-(?P<gran>g(?P<gs>[0-9]{1,9})|per-channel|per-tensor|channel|tensor))?(?P<asym>-asym)?(?P<restricted>-restricted)?",
            text.strip().lower(),
        )
        if not match:
            raise FormatError(
                f"cannot read format {text!r}; examples: int8, int4-g128, int3-g64-asym, int4-g128-restricted, "
                "fp8-e4m3, nf4-g64, mxfp4, nvfp4, fp8-block"
            )
        kind = match["kind"] or "int"
        if kind.startswith("mx") or kind in BLOCK_SPECS:
            fmt = _block_scaled_format(BLOCK_ALIASES.get(kind, kind), text, bool(match["gran"] or match["asym"] or match["restricted"]))
            return replace(fmt, **overrides) if overrides else fmt
        n_bits = int(match["bits"]) if match["bits"] else {"nf4": 4}.get(kind, 8)
        gran_text = match["gran"] or ("g64" if kind == "nf4" else "per-channel")
        if gran_text.startswith("g"):
            granularity = Granularity("group", int(gran_text[1:]))
        else:
            granularity = Granularity("tensor" if "tensor" in gran_text else "channel")
        fmt = cls(kind=kind, n_bits=n_bits, symmetric=not match["asym"], granularity=granularity,
                  symmetric_range="restricted" if match["restricted"] else "full")
        return replace(fmt, **overrides) if overrides else fmt

    # --- storage ------------------------------------------------------------------------
    def scales_per_row(self, in_features: int) -> int:
        self.granularity.check_divides(in_features)
        return self.granularity.groups_per_row(in_features)

    def storage(self, out_features: int, in_features: int) -> StorageBreakdown:
        """Exact bytes of a packed (out_features, in_features) weight in this format.

        Integer codes are packed densely (``ceil(numel * bits / 8)`` bytes), as ``pack`` does;
        zero-points are packed at ``n_bits`` each; scales take their dtype's width.
        """
        if self.is_block_scaled:
            return _block_scaled_storage(self, out_features, in_features)
        n_scales = 1 if self.granularity.kind == "tensor" else out_features * self.scales_per_row(in_features)
        numel = out_features * in_features
        scale_bytes = n_scales * torch.tensor([], dtype=self.torch_scale_dtype).element_size()
        zero_bytes = math.ceil(n_scales * self.n_bits / 8) if self.has_zero_point else 0
        return StorageBreakdown(numel, math.ceil(numel * self.n_bits / 8), scale_bytes, zero_bytes)

    def bits_per_weight(self, in_features: int, out_features: int = 4096) -> float:
        """Effective bits per weight including scale and zero-point overhead.

        For group and channel granularity this does not depend on ``out_features``; for
        per-tensor it does (barely), hence the default of a typical layer's height.
        """
        return self.storage(out_features, in_features).bits_per_weight


@dataclass(frozen=True)
class StorageBreakdown:
    """Bytes of one packed weight: codes, scales and zero-points."""

    numel: int
    weight_bytes: int
    scale_bytes: int
    zero_point_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.scale_bytes + self.zero_point_bytes

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.total_bytes / self.numel if self.numel else 0.0


def _block_scaled_format(kind: str, text: str, has_suffix: bool) -> QuantFormat:
    if kind not in BLOCK_SPECS:
        raise FormatError(f"cannot read format {text!r}; the scaled-block formats are {', '.join(BLOCK_SPECS)}")
    if has_suffix:
        raise FormatError(f"{kind} has a fixed block and is symmetric; write just {kind!r}")
    spec = BLOCK_SPECS[kind]
    return QuantFormat(kind=kind, n_bits=spec.element.n_bits, granularity=Granularity("group", spec.group_size),
                       scale_dtype=spec.scale)


def _block_scaled_storage(fmt: QuantFormat, out_features: int, in_features: int) -> StorageBreakdown:
    """Codes at the element width, one 8- or 32-bit scale per block (or tile), NVFP4's fp32 per tensor.

    MXFP4: 4 + 8/32 = 4.25 bits per weight; NVFP4: 4 + 8/16 + 32/numel; FP8 block: 8 + 32/16384.
    """
    spec = BLOCK_SPECS[fmt.kind]
    fmt.granularity.check_divides(in_features)
    numel = out_features * in_features
    scale_bytes = spec.n_scales(out_features, in_features) * spec.scale_bits // 8 + (4 if spec.global_scale else 0)
    return StorageBreakdown(numel, math.ceil(numel * fmt.n_bits / 8), scale_bytes, 0)
