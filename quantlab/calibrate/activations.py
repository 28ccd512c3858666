"""Fake activation quantization: what an INT8 (or INT4) activation path costs a linear layer.

Two ways to choose the scale of a linear layer's input ``x`` (viewed as ``(tokens, features)``):

- **dynamic per-token**: one scale per row, computed on the fly from that row's absmax, as the
  W8A8 kernels of SmoothQuant and LLM.int8() do. An outlier channel only costs the tokens it
  appears in, since every row has its own scale.
- **static per-tensor**: one scale for the whole tensor, calibrated ahead of time by an observer
  on calibration batches (min-max, a percentile of |x|, or the clip ratio with the least MSE).
  This is the cheap path (no reduction at run time), and the one where an outlier channel hurts
  most: the scale is set by a few large values and every other channel is left with a handful
  of codes. SmoothQuant exists to make this path usable.

Activations use symmetric integers with fp32 scales (kernels compute them in fp32 on the fly;
there is nothing to store) on the *restricted* range, scale = absmax / 127 at 8 bits: that is what the
W8A8 kernels compute at run time (vLLM's ``scaled_int8_quant``, SmoothQuant's), unlike weights, which
follow compressed-tensors' stored full-range grid (see :mod:`quantlab.numerics.formats`). The maths goes through :mod:`quantlab.numerics.primitives`: per-token is that
module's per-channel granularity on the ``(tokens, features)`` view, per-tensor its per-tensor one.

Example::

    >>> spec = ActSpec(n_bits=8, mode="static", observer="minmax", granularity="per-tensor")
    >>> scale = observe([torch.tensor([[1.0, -2.0], [0.5, 0.25]])], spec)
    >>> round(scale, 5)  # absmax 2 over qmax 127
    0.01575
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from quantlab.recipe import ActSpec
from quantlab.errors import FormatError
from quantlab.numerics.formats import Granularity, QuantFormat
from quantlab.numerics.primitives import QParams, choose_qparams, fake_quantize

log = logging.getLogger(__name__)

# Percentile and MSE observers need the values themselves, not a running statistic; this many
# rows (tokens) are kept, evenly spaced, which bounds their memory on long calibration sets.
MAX_OBSERVED_ROWS = 16384
DEFAULT_PERCENTILE = 99.99  # keeps all but 1 in 10,000 values inside the range


def _rows(x: torch.Tensor) -> torch.Tensor:
    """The ``(tokens, features)`` view of an activation of any leading shape."""
    return x.reshape(-1, x.shape[-1])


def activation_format(n_bits: int, granularity: str, observer: str = "minmax", percentile: float = DEFAULT_PERCENTILE) -> QuantFormat:
    """The engine format that quantizes activations: per-token rows or one per-tensor scale.

    Scales are fp32: an activation scale is computed at run time (dynamic) or is one number per
    layer (static), so there is no storage cost to round it for.
    """
    if granularity not in ("per-token", "per-tensor"):
        raise FormatError(f"activation granularity must be per-token or per-tensor, got {granularity!r}")
    gran = Granularity("channel") if granularity == "per-token" else Granularity("tensor")
    return QuantFormat(
        kind="int", n_bits=n_bits, symmetric=True, granularity=gran, scale_dtype="fp32",
        range_method=observer, percentile=percentile, symmetric_range="restricted",
    )


def _gather(x_batches: Iterable[torch.Tensor]) -> torch.Tensor:
    rows = torch.cat([_rows(x.detach()).float() for x in x_batches])  # (tokens, features)
    if rows.shape[0] > MAX_OBSERVED_ROWS:
        keep = torch.linspace(0, rows.shape[0] - 1, MAX_OBSERVED_ROWS).round().long()
        rows = rows[keep]
    return rows


def observe(x_batches: Iterable[torch.Tensor], spec: ActSpec) -> float:
    """The static per-tensor scale of ``spec.observer`` over calibration activations.

    ``minmax``: absmax / qmax, nothing clipped. ``percentile``: the ``DEFAULT_PERCENTILE``-th
    percentile of |x| / qmax, clipping the rarest values. ``mse``: the clip ratio (1.0 down to 0.5)
    whose fake-quantized activations have the least squared error, trading clipping for rounding.
    """
    rows = _gather(x_batches)
    if rows.numel() == 0:
        raise FormatError("no calibration activations to observe; use at least one calibration sample")
    fmt = activation_format(spec.n_bits, "per-tensor", spec.observer)
    return float(choose_qparams(rows, fmt).scale.reshape(-1)[0])


def fake_quantize_activation(x: torch.Tensor, spec: ActSpec, static_scale: float | None = None) -> torch.Tensor:
    """Quantize and dequantize ``x`` as ``spec`` says; same shape and dtype as ``x``.

    Dynamic mode computes its scales from ``x`` (per token or per tensor); static mode uses the
    calibrated ``static_scale`` and clips whatever lies beyond it.
    """
    rows = _rows(x)  # (tokens, features)
    if spec.mode == "static":
        if static_scale is None:
            raise FormatError("static activation quantization needs a calibrated scale; run observe() first")
        fmt = activation_format(spec.n_bits, "per-tensor")
        scale = torch.tensor(static_scale, dtype=torch.float32, device=x.device).reshape(1, 1, 1)
        qparams = QParams(scale, None, torch.ones_like(scale))
        return fake_quantize(rows, fmt, qparams).reshape(x.shape)
    fmt = activation_format(spec.n_bits, spec.granularity)
    return fake_quantize(rows, fmt).reshape(x.shape)


@dataclass(frozen=True)
class ActivationQuantizer:
    """A callable for ``QuantizedLinear.act_quantizer``: fake-quantizes the layer's input."""

    spec: ActSpec
    static_scale: float | None = None  # calibrated per-tensor scale; None in dynamic mode

    def __post_init__(self) -> None:
        if self.spec.mode == "static" and self.static_scale is None:
            raise FormatError("a static activation quantizer needs its calibrated scale; use calibrated_quantizer()")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize_activation(x, self.spec, self.static_scale)


def calibrated_quantizer(spec: ActSpec, x_batches: Iterable[torch.Tensor] | None = None) -> ActivationQuantizer:
    """The activation quantizer of one linear: static mode observes ``x_batches`` for its scale."""
    if spec.mode == "static":
        if x_batches is None:
            raise FormatError("static activation quantization needs calibration inputs for every linear")
        return ActivationQuantizer(spec, observe(x_batches, spec))
    return ActivationQuantizer(spec)
