"""What quantization does to one tensor: the playground's vector, a layer's weights, clipping.

Every function takes weights as (out_features, in_features) tensors, the layout
``architectures.weight_matrix`` returns, and a ``QuantFormat``; inputs are never modified.

Worked example, the playground's four values at INT4 symmetric per-tensor (full range: s = 1 / 7.5,
so -1.0 lands on the 16th level, -8)::

    >>> result = quantize_vector([0.0, 0.5, -1.0, 0.7], QuantFormat.parse("int4-per-tensor"))
    >>> result.table["code"].tolist()
    [0, 4, -8, 5]
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from quantlab.models.architectures import conv1d_stored, find_linears, weight_matrix
from quantlab.errors import FormatError, ModelLoadError
from quantlab.numerics.formats import FP8_DTYPES, NF4_LEVELS, RANGE_METHODS, Granularity, QuantFormat
from quantlab.numerics.minifloats import BLOCK_SPECS
from quantlab.numerics.primitives import (
    ErrorReport,
    QParams,
    check_format_fits,
    choose_qparams,
    clipped_mask,
    error_report,
    fake_quantize,
    quantize,
    to_blocks,
    to_blocks_codes,
)
from quantlab.models.sizing import DEFAULT_KEEP_FULL_PRECISION, matrix_role
from quantlab.models.weightfiles import describe_skipped, matrix_tensors, skipped_tensors

DISTRIBUTIONS = ("normal", "laplace", "uniform")
CLIP_RATIOS = tuple(round(0.30 + 0.035 * i, 3) for i in range(21))  # 0.30 .. 1.00


# --- the matrices to look at -----------------------------------------------------------------
@dataclass(frozen=True)
class NamedMatrix:
    """One quantizable weight matrix of a model or a weights file."""

    name: str  # module path ("model.layers.0.mlp.down_proj") or tensor name for files
    block: int | None  # transformer block index, when the name says
    role: str  # q/k/v/o/gate/up/down/... from the architecture tables
    weight: torch.Tensor  # (out, in); a view of the model's weight, never modified here


def model_matrices(model: nn.Module) -> list[NamedMatrix]:
    """Every linear inside the transformer blocks, as (out, in) views (GPT-2's Conv1D transposed)."""
    return [NamedMatrix(info.name, info.block, info.role, weight_matrix(model.get_submodule(info.name)).detach())
            for info in find_linears(model)]


def file_matrices(tensors: dict[str, torch.Tensor]) -> list[NamedMatrix]:
    """The 2-D float tensors of a weights file, except embeddings/norms/lm_head, as (out, in) views.

    Taken as stored, except GPT-2's Conv1D matrices, stored (in, out) and transposed here, so that
    input channels are columns for every file, as they are for a loaded model.
    """
    found = []
    transposed = conv1d_stored({name: tuple(t.shape) for name, t in tensors.items()})
    for name, tensor in matrix_tensors(tensors):
        if any(part in name for part in DEFAULT_KEEP_FULL_PRECISION):
            continue
        block = re.search(r"\.(\d+)\.", name)
        matrix = tensor.t() if name in transposed else tensor
        found.append(NamedMatrix(name, int(block[1]) if block else None, matrix_role(name), matrix))
    if not found:
        skipped = describe_skipped(skipped_tensors(tensors))
        raise ModelLoadError("the file holds no 2-D float matrices outside embeddings, norms and lm_head; "
                             "nothing to quantize" + (f" (skipped: {skipped})" if skipped else ""))
    return found


# --- the playground: one small vector, every step visible ------------------------------------
@dataclass(frozen=True)
class VectorQuantization:
    """A vector quantized step by step: per value, per group, and the grid of the first group."""

    table: pd.DataFrame  # per value: group, value, scaled, code, dequantized, error, clipped
    groups: pd.DataFrame  # per group: scale, zero_point, lowest and highest representable value
    levels: np.ndarray  # every value the grid of group ``grid_group`` can represent, ascending
    report: ErrorReport
    grid_group: int = 0


def sample_distribution(kind: str, n: int, seed: int = 0, spread: float = 1.0) -> np.ndarray:
    """``n`` seeded draws from a normal, Laplace (heavy-tailed, like real weights) or uniform law."""
    if kind not in DISTRIBUTIONS:
        raise FormatError(f"distribution must be one of {DISTRIBUTIONS}, got {kind!r}")
    if n < 1:
        raise FormatError(f"need at least one value, got {n}")
    rng = np.random.default_rng(seed)
    draw = {"normal": rng.normal, "laplace": rng.laplace, "uniform": lambda s, size: rng.uniform(-s, s, size)}[kind]
    return np.round(draw(0.0, spread, n) if kind != "uniform" else draw(spread, n), 4)


def with_outlier(values: Sequence[float], factor: float = 10.0) -> list[float]:
    """The values with one more appended: ``factor`` x the largest magnitude (nothing is overwritten)."""
    if not values:
        raise FormatError("add some values before adding an outlier")
    out = [float(v) for v in values]
    peak = max(abs(v) for v in out) or 1.0
    return out + [round(factor * peak, 4)]


@dataclass(frozen=True)
class ScaleSteps:
    """How one group's scale comes about, for a formula with the numbers in (integer grids, min-max)."""

    group: int
    low: float  # the group's range: min(x, 0) and max(x, 0) (asymmetric), or -max|x| and max|x| (symmetric)
    high: float
    levels: float  # what the range is divided by: (qmax - qmin) / 2 symmetric (7.5 full, 7 restricted at 4 bits),
    # 2^b - 1 steps asymmetric
    exact_scale: float  # the division in fp64, before the scale is stored
    stored_scale: float  # what the format stores (fp16 by default) and quantizes with
    zero_point: int | None

    @property
    def rounded(self) -> bool:
        """Whether storing the scale changed it (fp16 keeps ~3 significant digits)."""
        return not math.isclose(self.exact_scale, self.stored_scale, rel_tol=1e-7, abs_tol=0.0)


def scale_steps(values: Sequence[float], fmt: QuantFormat, group: int = 0) -> ScaleSteps:
    """The numbers in s = max|x| / qmax (symmetric) or s = (max - min) / (2^b - 1) and z = round(-min / s)."""
    if fmt.kind != "int" or fmt.range_method != "minmax":
        raise FormatError("the scale formula with numbers is for integer formats with min-max ranges")
    x = torch.tensor([float(v) for v in values], dtype=torch.float64)
    blocks = to_blocks(x, fmt)  # (1, groups, g)
    if not 0 <= group < blocks.shape[1]:
        raise FormatError(f"group {group} does not exist; this vector has {blocks.shape[1]} group(s)")
    block = blocks[0, group]
    if fmt.symmetric:
        high = float(block.abs().max())
        low, levels = -high, fmt.symmetric_divisor
        exact = high / levels
    else:
        low, high = min(float(block.min()), 0.0), max(float(block.max()), 0.0)
        levels = 2**fmt.n_bits - 1
        exact = (high - low) / levels
    qparams = choose_qparams(x.float(), fmt)
    stored = float(qparams.scale.float().reshape(-1)[group])
    zero = int(qparams.zero_point.reshape(-1)[group]) if qparams.zero_point is not None else None
    return ScaleSteps(group, low, high, levels, exact, stored, zero)


def largest_group(values: Sequence[float], fmt: QuantFormat) -> int:
    """The group holding the largest |value|: where an outlier blows the scale up."""
    blocks = to_blocks(torch.tensor([float(v) for v in values], dtype=torch.float32), fmt)  # (1, groups, g)
    return int(blocks[0].abs().amax(dim=-1).argmax())


def playground_group_sizes(n_values: int) -> list[int]:
    """Group sizes that split ``n_values`` into at least two equal groups (every divisor, for teaching)."""
    return [g for g in range(2, n_values // 2 + 1) if n_values % g == 0]


def quantize_vector(values: Sequence[float], fmt: QuantFormat, grid_group: int = 0) -> VectorQuantization:
    """Quantize a short vector and return every intermediate: ``x/s (+ z)``, code, x̂, error, clipped.

    ``levels`` are the grid of group ``grid_group`` (the chart draws that group's grid).
    """
    x = torch.tensor([float(v) for v in values], dtype=torch.float32)
    if not torch.isfinite(x).all():
        raise FormatError("every value must be a finite number; remove NaN or Inf entries")
    check_format_fits(tuple(x.shape), fmt)
    qparams = choose_qparams(x, fmt)
    qt = quantize(x, fmt, qparams)
    x_hat = fake_quantize(x, fmt, qparams)
    blocks = to_blocks(x, fmt)  # (1, groups, g)
    scale = qparams.working_scale().expand_as(blocks).reshape(-1)
    zero = torch.zeros_like(scale)
    if qparams.zero_point is not None:
        zero = qparams.zero_point.expand_as(blocks).reshape(-1).float()
    group = torch.arange(blocks.shape[1]).repeat_interleave(blocks.shape[2])
    codes = to_blocks_codes(qt).reshape(-1)
    table = pd.DataFrame({
        "group": group.numpy(),
        "value": x.numpy(),
        "scale": scale.numpy(),
        "zero_point": zero.numpy().astype(int),
        "scaled": (x / scale + zero).numpy(),  # x/s (+ z) before rounding
        "code": codes.float().numpy(),  # int codes, NF4 level index, or the float8 value
        "dequantized": x_hat.numpy(),
        "error": (x_hat - x).numpy(),
        "clipped": clipped_mask(x, fmt, qparams).numpy(),
    })
    if fmt.kind == "int":
        table["code"] = table["code"].astype(int)
    grid_group = min(max(grid_group, 0), blocks.shape[1] - 1)
    return VectorQuantization(table, group_table(qparams, fmt), grid_levels(fmt, qparams, 0, grid_group),
                              error_report(x, fmt, qparams), grid_group)


def compare_symmetric_ranges(values: Sequence[float], fmt: QuantFormat) -> dict[str, VectorQuantization]:
    """The same vector on the full and the restricted symmetric grid of ``fmt`` (a symmetric int format).

    The full range spends the 16th INT4 level (-8): its step is absmax / 7.5 instead of absmax / 7,
    finer for every value, at the price of clamping a positive absmax (7.5 steps) to 7 steps.
    """
    if not (fmt.kind == "int" and fmt.symmetric):
        raise FormatError("the full and restricted ranges differ for symmetric integer formats only")
    return {grid: quantize_vector(values, replace(fmt, symmetric_range=grid)) for grid in ("full", "restricted")}


def range_summary(results: dict[str, VectorQuantization], fmt: QuantFormat) -> pd.DataFrame:
    """One row per grid of ``compare_symmetric_ranges``: codes, step, error, clipped values, extra-level use."""
    rows = []
    for grid, vq in results.items():
        grid_fmt = replace(fmt, symmetric_range=grid)
        rows.append({
            "grid": grid, "codes": f"[{grid_fmt.qmin}, {grid_fmt.qmax}]", "levels": grid_fmt.qmax - grid_fmt.qmin + 1,
            "scale rule": f"absmax / {grid_fmt.symmetric_divisor:g}", "scale (first group)": float(vq.groups["scale"].iloc[0]),
            "mse": vq.report.mse, "values clipped": int(vq.table["clipped"].sum()),
            "values on the extra level": int((vq.table["code"] == grid_fmt.qmin).sum()) if grid == "full" else 0,
        })
    return pd.DataFrame(rows)


def group_table(qparams: QParams, fmt: QuantFormat) -> pd.DataFrame:
    """Per block: its scale, zero-point and the lowest/highest value its grid represents."""
    scale = qparams.working_scale().reshape(-1)
    zero = qparams.zero_point.reshape(-1).float() if qparams.zero_point is not None else torch.zeros_like(scale)
    lo_code, hi_code = _code_range(fmt)
    return pd.DataFrame({
        "group": np.arange(scale.numel()),
        "scale": scale.numpy(),
        "zero_point": zero.numpy().astype(int),
        "lowest": ((lo_code - zero) * scale).numpy(),
        "highest": ((hi_code - zero) * scale).numpy(),
        "clip_ratio": qparams.clip_ratio.reshape(-1).numpy(),
    })


def _code_range(fmt: QuantFormat) -> tuple[float, float]:
    if fmt.kind == "int":
        return float(fmt.qmin), float(fmt.qmax)
    if fmt.kind == "nf4":
        return -1.0, 1.0
    if fmt.is_block_scaled:
        return -BLOCK_SPECS[fmt.kind].element.max, BLOCK_SPECS[fmt.kind].element.max
    top = float(torch.finfo(FP8_DTYPES[fmt.kind]).max)
    return -top, top


def grid_levels(fmt: QuantFormat, qparams: QParams, row: int, group: int) -> np.ndarray:
    """Every value block (row, group) can represent after dequantization, ascending."""
    scale = qparams.working_scale()[row, group, 0]
    if fmt.kind == "int":
        zero = qparams.zero_point[row, group, 0].float() if qparams.zero_point is not None else 0.0
        return ((torch.arange(fmt.qmin, fmt.qmax + 1).float() - zero) * scale).numpy()
    if fmt.kind == "nf4":
        return (torch.tensor(NF4_LEVELS) * scale).numpy()
    if fmt.is_block_scaled:  # the element's values times this block's working scale
        return (torch.tensor(BLOCK_SPECS[fmt.kind].element.grid()) * scale).numpy()
    # Every finite float8 value: view all 256 bit patterns as the float8 dtype.
    values = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPES[fmt.kind]).float()
    return (torch.unique(values[torch.isfinite(values)]) * scale).numpy()


# --- a weight matrix under one format --------------------------------------------------------
@dataclass(frozen=True)
class WeightQuantization:
    """One layer's weights under one format: the error, the scales and summary numbers."""

    fmt_name: str
    error: torch.Tensor  # (out, in) x̂ - x, fp32
    scales: np.ndarray  # one per block (row, group), fp32
    qparams: QParams
    report: ErrorReport
    bits_per_weight: float


def quantize_weight(W: torch.Tensor, fmt: QuantFormat) -> WeightQuantization:
    """Fake-quantize ``W`` (out, in) and keep what the Weights and Clipping pages plot."""
    check_format_fits(tuple(W.shape), fmt)
    with torch.no_grad():
        Wf = W.detach().float()
        qparams = choose_qparams(Wf, fmt)
        error = fake_quantize(Wf, fmt, qparams) - Wf  # (out, in)
        report = error_report(Wf, fmt, qparams)
    bits = fmt.storage(*Wf.shape).bits_per_weight
    return WeightQuantization(fmt.name, error, qparams.working_scale().reshape(-1).numpy(), qparams, report, bits)


def histogram(values: torch.Tensor | np.ndarray, bins: int = 80,
              value_range: tuple[float, float] | None = None) -> pd.DataFrame:
    """Counts per bin (left, right, center, count): a histogram as data, cheap for any tensor size."""
    v = torch.as_tensor(values).detach().float().reshape(-1)
    v = v[torch.isfinite(v)]
    if v.numel() == 0:
        return pd.DataFrame({"left": [], "right": [], "center": [], "count": []})
    lo, hi = value_range or (v.min().item(), v.max().item())
    if hi <= lo:  # a constant tensor: one bin around its value
        lo, hi = lo - 0.5, hi + 0.5
    counts = torch.histc(v, bins=bins, min=lo, max=hi)
    edges = torch.linspace(lo, hi, bins + 1)
    return pd.DataFrame({
        "left": edges[:-1].numpy(), "right": edges[1:].numpy(),
        "center": ((edges[:-1] + edges[1:]) / 2).numpy(), "count": counts.numpy().astype(int),
    })


def pick_block(qparams: QParams, which: str = "largest") -> tuple[int, int]:
    """(row, group) of the block with the largest or the median scale: whose grid to overlay."""
    scale = qparams.working_scale()[..., 0]  # (rows, groups)
    flat = scale.reshape(-1)
    if which == "largest":
        index = int(flat.argmax())
    elif which == "median":
        index = int(flat.argsort()[flat.numel() // 2])
    else:
        raise FormatError(f"block choice must be 'largest' or 'median', got {which!r}")
    return divmod(index, scale.shape[1])


@dataclass(frozen=True)
class WeightViews:
    """What the Weights page shows for one layer and format, as small tables."""

    weights: pd.DataFrame  # histogram of the weights
    errors: pd.DataFrame  # histogram of x̂ - x
    scales: pd.DataFrame  # histogram of the block scales
    levels: np.ndarray  # the grid of ``block``
    block: tuple[int, int]  # (row, group) whose grid is overlaid
    summary: dict  # format, bits per weight, error and clipping figures

    def histograms(self) -> pd.DataFrame:
        """The three histograms as one long table (column ``of``: weights, errors, scales), for download."""
        parts = {"weights": self.weights, "errors": self.errors, "scales": self.scales}
        return pd.concat([table.assign(of=name) for name, table in parts.items()], ignore_index=True)


def weight_views(W: torch.Tensor, fmt: QuantFormat, which_block: str = "largest", bins: int = 120) -> WeightViews:
    """Histograms of a layer's weights, its quantization error and its scales, and one block's grid."""
    wq = quantize_weight(W, fmt)
    block = pick_block(wq.qparams, which_block)
    row = format_comparison_row(wq)
    return WeightViews(histogram(W, bins), histogram(wq.error, bins), histogram(wq.scales, min(bins, 60)),
                       grid_levels(fmt, wq.qparams, *block), block, row)


def format_comparison_row(wq: WeightQuantization) -> dict:
    rel = wq.report.relative_error
    return {
        "format": wq.fmt_name, "bits_per_weight": wq.bits_per_weight, "mse": wq.report.mse, "relative_error": rel,
        "sqnr_db": float(10 * np.log10(1 / rel)) if rel > 0 else float("inf"),
        "clipped_fraction": wq.report.clipped_fraction, "max_abs_error": float(wq.error.abs().max()),
    }


def format_comparison(W: torch.Tensor, fmts: Sequence[QuantFormat]) -> pd.DataFrame:
    """One row per format: bits per weight, MSE, relative error, SQNR (dB), clipped share, worst error."""
    return pd.DataFrame([format_comparison_row(quantize_weight(W, fmt)) for fmt in fmts])


def error_histograms(W: torch.Tensor, fmts: Sequence[QuantFormat], bins: int = 100) -> dict[str, pd.DataFrame]:
    """The error histogram of each format over one shared range, so that their widths compare."""
    errors = {fmt.name: quantize_weight(W, fmt).error for fmt in fmts}
    reach = max(float(e.abs().max()) for e in errors.values()) or 1.0
    return {name: histogram(error, bins, (-reach, reach)) for name, error in errors.items()}


def block_values(W: torch.Tensor, fmt: QuantFormat, row: int, group: int) -> torch.Tensor:
    """The values of one block (row, group) of ``W`` under ``fmt``'s granularity, as a 1-D tensor."""
    blocks = to_blocks(W.detach(), fmt)  # (rows, groups, g)
    if not (0 <= row < blocks.shape[0] and 0 <= group < blocks.shape[1]):
        raise FormatError(f"block ({row}, {group}) is outside 0..{blocks.shape[0] - 1}, 0..{blocks.shape[1] - 1}")
    return blocks[row, group].clone()


def single_block_format(fmt: QuantFormat, n_values: int) -> QuantFormat:
    """``fmt`` with one scale for ``n_values`` values: how one block of a layer is quantized on its own."""
    if fmt.is_block_scaled:  # a block is a one-block tensor of the format (NVFP4: its own global scale)
        return fmt
    return replace(fmt, granularity=Granularity("tensor")) if fmt.kind != "nf4" else replace(
        fmt, granularity=Granularity("group", n_values))


# --- clipping --------------------------------------------------------------------------------
def clipping_sweep(x: torch.Tensor, fmt: QuantFormat, ratios: Sequence[float] = CLIP_RATIOS) -> pd.DataFrame:
    """Error against the clipping ratio (share of each block's min-max range kept), split in two.

    The range [ratio·lo, ratio·hi] of every block is the min-max range of ``ratio · x``, so the
    qparams come from ``choose_qparams`` on the scaled tensor and are then applied to ``x``.
    """
    minmax = replace(fmt, range_method="minmax")
    xf = x.detach().float()
    rows = []
    for ratio in ratios:
        qp = choose_qparams(xf * ratio, minmax)
        qp = replace(qp, clip_ratio=torch.full_like(qp.clip_ratio, ratio))
        report = error_report(xf, minmax, qp)
        rows.append({"clip_ratio": ratio, **_report_columns(report)})
    return pd.DataFrame(rows)


def _report_columns(report: ErrorReport) -> dict[str, float]:
    return {
        "mse": report.mse, "rounding_mse": report.rounding_mse, "clipping_mse": report.clipping_mse,
        "clipped_fraction": report.clipped_fraction, "relative_error": report.relative_error,
    }


def range_method_table(x: torch.Tensor, fmt: QuantFormat) -> pd.DataFrame:
    """For each range method (min-max, percentile, MSE): mean clip ratio, share clipped, error split."""
    xf = x.detach().float()
    rows = []
    for method in RANGE_METHODS if not fmt.is_block_scaled else ("minmax",):  # block scales: min-max only
        method_fmt = replace(fmt, range_method=method)
        qp = choose_qparams(xf, method_fmt)
        report = error_report(xf, method_fmt, qp)
        label = f"percentile {fmt.percentile:g}" if method == "percentile" else method
        rows.append({"range_method": label, "mean_clip_ratio": float(qp.clip_ratio.mean()), **_report_columns(report)})
    return pd.DataFrame(rows)


def best_ratio(sweep: pd.DataFrame) -> pd.Series:
    """The row of a ``clipping_sweep`` with the least MSE (ties: the least clipping)."""
    return sweep.sort_values(["mse", "clip_ratio"], ascending=[True, False]).iloc[0]
