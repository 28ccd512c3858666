"""Elementwise encode/decode kernels of every format, run eagerly or fused with torch.compile.

Fake-quantizing is a chain of elementwise steps (divide, round, shift, clamp, shift back, multiply)
over the whole weight. Each step is memory-bound, so eagerly the chain costs several passes over
memory; Inductor fuses it into one loop that reads the weight once and writes the result once.

The same Python functions run in both modes, so the fused result equals the eager one bit for bit:
Inductor keeps the true division by the (tensor) scale and round-half-to-even, and
``bench/bench_primitives.py`` checks the equality on every run. The functions mutate only the
fresh temporaries they create, never their arguments, so a failed compiled call can be retried
eagerly.

Compilation costs tens of seconds once per kernel, so ``auto`` mode fuses only tensors of at least
``FUSED_MIN_NUMEL`` values, where it pays off (a 7B model's layers), and never the small tensors of
unit tests or of the bundled model. ``QUANTLAB_FUSED=never|auto|always`` picks the mode at start-up;
``set_fused_mode`` changes it at run time.

Shapes: ``blocks`` is fp32 (rows, groups, g); ``scale`` fp32 and ``zero_point`` int32 are
(rows, groups, 1).
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch

from quantlab.errors import FormatError

log = logging.getLogger(__name__)

FUSED_MODES = ("never", "auto", "always")
FUSED_MIN_NUMEL = 1 << 22  # 4.2M values: a 2048x2048 weight and up, where compiling pays off


def int_codes(blocks, scale, zero_point: torch.Tensor | None, qmin: int, qmax: int) -> torch.Tensor:
    """``clamp(round(x / s) + z, qmin, qmax)`` as integer-valued fp32 (exact: |codes| <= 255)."""
    codes = blocks / scale
    codes.round_()  # round half to even, as torch.round
    if zero_point is not None:
        codes.add_(zero_point)
    return codes.clamp_(qmin, qmax)


def int_values(codes: torch.Tensor, scale, zero_point: torch.Tensor | None) -> torch.Tensor:
    """``(q - z) * s``; ``codes`` must be a fresh fp32 tensor (it is overwritten)."""
    if zero_point is not None:
        codes.sub_(zero_point)
    return codes.mul_(scale)


def nf4_codes(blocks, scale, midpoints: torch.Tensor) -> torch.Tensor:
    """Index of the nearest NF4 level, int32: the number of midpoints below ``x / s``. Values
    beyond +-1 land on the end levels by themselves, so no clamp pass is needed."""
    # Contiguous: the quotient keeps the strides of a transposed view (GPT-2's Conv1D weights), and
    # bucketize on a strided input copies it anyway, with a warning per call.
    return torch.bucketize((blocks / scale).contiguous(), midpoints, out_int32=True)


def nf4_codes_select(blocks, scale, midpoints: torch.Tensor) -> torch.Tensor:
    """``nf4_codes`` as 15 compare-and-adds: Inductor fuses and vectorizes these, while its
    bucketize is a scalar binary search (~10x slower). Eagerly it would be 30 passes: fused only."""
    scaled = blocks / scale
    codes = torch.zeros_like(scaled, dtype=torch.int32)
    for i in range(midpoints.numel()):
        codes += scaled > midpoints[i]
    return codes


def nf4_values(codes: torch.Tensor, scale, levels: torch.Tensor) -> torch.Tensor:
    """``levels[q] * s``; ``codes`` int32 or int64 (uint8 would index as a boolean mask)."""
    return levels[codes].mul_(scale)


def fp8_codes(blocks, scale, fp8_max: float, fp8_dtype: torch.dtype) -> torch.Tensor:
    """Saturate before the cast: float8_e4m3fn has no infinity and would turn overflow into NaN."""
    return (blocks / scale).clamp_(-fp8_max, fp8_max).to(fp8_dtype)


def fake_int(blocks, scale, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    return int_values(int_codes(blocks, scale, zero_point, qmin, qmax), scale, zero_point)


def fake_nf4(blocks, scale, midpoints: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    return nf4_values(nf4_codes(blocks, scale, midpoints), scale, levels)


def fake_nf4_select(blocks, scale, midpoints: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """``fake_nf4`` as a chain of selects (fused only, as ``nf4_codes_select``). Midpoints are
    sorted, so the last select that fires picks ``levels[count of midpoints below]``: the same
    level as bucketize, bit for bit."""
    scaled = blocks / scale
    values = levels[0].expand_as(scaled)
    for i in range(midpoints.numel()):
        values = torch.where(scaled > midpoints[i], levels[i + 1], values)
    return values.mul(scale)


def fake_fp8(blocks, scale, fp8_max: float, fp8_dtype: torch.dtype) -> torch.Tensor:
    return fp8_codes(blocks, scale, fp8_max, fp8_dtype).float().mul_(scale)


_mode = os.environ.get("QUANTLAB_FUSED", "auto")
if _mode not in FUSED_MODES:
    log.warning("QUANTLAB_FUSED=%s is not one of %s; using auto", _mode, FUSED_MODES)
    _mode = "auto"
_compiled: dict[Callable, Callable] = {}


def set_fused_mode(mode: str) -> None:
    """``never``: always eager; ``auto``: fuse tensors of >= FUSED_MIN_NUMEL values; ``always``: fuse all."""
    global _mode
    if mode not in FUSED_MODES:
        raise FormatError(f"fused mode must be one of {FUSED_MODES}, got {mode!r}")
    _mode = mode


def fused_mode() -> str:
    return _mode


def run(kernel: Callable[..., torch.Tensor], blocks: torch.Tensor, *args, fused: Callable | None = None):
    """``kernel(blocks, *args)``, through the compiled form of ``fused`` (default: ``kernel``, and it
    must give the same result) when the mode and the size call for it.

    No autograd: rounding has no useful gradient, and recording one would keep every temporary
    of a large weight alive.
    """
    with torch.no_grad():
        if not _wants_fused(blocks.numel()):
            return kernel(blocks, *args)
        try:
            return _compiled_form(fused or kernel)(blocks, *args)
        except Exception as exc:  # any compiler failure (no C compiler, unsupported op) must not stop quantization
            log.warning("fused %s kernel failed (%s: %s); using eager kernels from now on",
                        (fused or kernel).__name__, type(exc).__name__, exc)
            set_fused_mode("never")
            return kernel(blocks, *args)


def _wants_fused(numel: int) -> bool:
    if _mode == "always":
        return True
    return _mode == "auto" and numel >= FUSED_MIN_NUMEL


def _compiled_form(kernel: Callable) -> Callable:
    if kernel not in _compiled:
        log.info("compiling the fused %s kernel (once per process; tens of seconds on a small CPU)", kernel.__name__)
        _compiled[kernel] = torch.compile(kernel)
    return _compiled[kernel]
