"""Clipping: trade a few clamped values for a finer grid, and find the ratio with the least error."""

import dataclasses

import pandas as pd
import streamlit as st

from pages.common import (
    cached_view, current_format, current_matrices, download_table, explain, matrix_picker, results_key, user_errors,
)
from quantlab.analysis import plots
from quantlab.analysis import blockformats, tensors
from quantlab.numerics.formats import Granularity, QuantFormat
from quantlab.numerics.primitives import to_blocks


@cached_view(spinner="Sweeping clip ratios…")
def _clipping(key: str, layer: str, fmt_repr: str, block: tuple | None, _W, _fmt) -> tuple:
    values = _W if block is None else tensors.block_values(_W, _fmt, *block)
    fmt = _fmt if block is None else tensors.single_block_format(_fmt, values.numel())
    sweep, methods = tensors.clipping_sweep(values, fmt), _range_methods(values, fmt)
    best = tensors.best_ratio(sweep)
    labelled = methods.assign(method=methods["range_method"] + " · " + methods["scales"])
    return sweep, methods, best, plots.clipping_figure(sweep, best), plots.error_split_figure(labelled, "method")


def _range_methods(values, fmt: QuantFormat):
    """The methods at the format's scales and, beside them, with one scale for the whole tensor.

    A percentile is taken over the values that share a scale: 99.9 % of a group of 128 leaves out 0.13 of a
    value, i.e. nothing, so at the usual group and channel scales percentile is min-max. One scale over the
    whole tensor leaves out its top 0.1 %: the rows side by side show what the method does and why small
    scales hide it.
    """
    scopes = [fmt] if fmt.is_block_scaled or fmt.granularity.kind == "tensor" else [
        fmt, dataclasses.replace(fmt, granularity=Granularity("tensor"))]
    return pd.concat([tensors.range_method_table(values, scope).assign(scales=scope.granularity.label)
                      for scope in scopes], ignore_index=True)


def _values_per_scale(fmt: QuantFormat, weight) -> int:
    return {"group": fmt.granularity.group_size, "channel": weight.shape[-1]}.get(fmt.granularity.kind, weight.numel())


@cached_view(spinner="Fitting block scales…")
def _scale_fits(key: str, layer: str, chosen: str, _W) -> tuple:
    names = dict.fromkeys([n for n in (chosen, "mxfp4", "nvfp4") if n])
    fits = {name: blockformats.scale_fit(_W, QuantFormat.parse(name)) for name in names}
    hists = {name: tensors.histogram(fit["fit"].to_numpy().copy(), 60, (0.5, 1.25)) for name, fit in fits.items()}
    return blockformats.scale_fit_summary(fits), plots.overlaid_histograms_figure(
        hists, f"{layer}: absmax / grid top, per block", "fit (above 1: clipped; below 1: range unused)")


st.title("Clipping")
explain("clipping")
st.write("Min-max scaling keeps every value representable, but one large value stretches the grid for all the "
         "others. Shrinking the range (a clip ratio below 1) clamps the extremes and refines the grid. Rounding "
         "error falls, clipping error rises: the best ratio balances them.")
fmt = current_format()
matrices = current_matrices()
layer = matrix_picker(matrices, key="c_layer")
with user_errors():
    rows, groups = to_blocks(layer.weight, fmt).shape[:2]
scope = st.radio("Look at", ("the whole layer", "one block"), horizontal=True, key="c_scope",
                 help="The whole layer: every block (row or group) keeps its own scale, all at the same ratio.")
block = None
if scope == "one block":
    left, right = st.columns(2)
    row = left.number_input(f"Row (0..{rows - 1})", 0, rows - 1, 0, key="c_row")
    group = right.number_input(f"Group (0..{groups - 1})", 0, groups - 1, 0, key="c_group")
    block = (int(row), int(group))
with user_errors():
    sweep, methods, best, sweep_figure, methods_figure = _clipping(results_key(), layer.name, repr(fmt), block,
                                                                   layer.weight, fmt)

cols = st.columns(3)
cols[0].metric("Best clip ratio", f"{best['clip_ratio']:.2f}")
cols[1].metric("Error at best vs min-max", f"{best['mse'] / sweep['mse'].iloc[-1]:.1%}")
cols[2].metric("Values clipped at best", f"{best['clipped_fraction']:.2%}")
st.plotly_chart(sweep_figure, key="c_sweep")
download_table(sweep, "clipping_sweep")

st.subheader("Range methods")
st.write("**min-max** uses the full range; **percentile** keeps a share of the values (sidebar setting) inside it; "
         "**MSE** searches each block's clip ratio for the least squared error.")
if not fmt.is_block_scaled and block is None:
    per_scale = _values_per_scale(fmt, layer.weight)
    left_out = per_scale * (100 - fmt.percentile) / 100
    st.caption(f"A percentile is taken over the values that share one scale: {per_scale:,} here ({fmt.granularity.label}), "
               f"so keeping {fmt.percentile:g} % leaves out {left_out:.3g} value(s) per scale"
               + (" — less than one, so nothing is clipped and percentile gives the same grid as min-max. "
                  if left_out < 1 else ". ")
               + f"With one scale for the whole tensor ({layer.weight.numel():,} values, the per-tensor rows) it clips "
               f"the top {100 - fmt.percentile:g} %, {layer.weight.numel() * (100 - fmt.percentile) / 100:,.0f} values, "
               "and the grid gets finer for all the others.")
st.plotly_chart(methods_figure, key="c_methods")
st.dataframe(methods, hide_index=True, width="stretch")
download_table(methods, "clipping_range_methods")

st.subheader("Block formats: does each block's scale fit its values?")
st.write("A scaled-block format picks each block's scale from its absmax, but can only store some scales. "
         "Fit = absmax / (top of the block's grid): above 1 the largest values **clip** to the top code, below 1 the "
         "top codes go **unused** (range wasted). MXFP4's power-of-two scale spreads the fit over [0.58, 1.17); "
         "NVFP4's FP8 scale keeps it within 1/16 of 1.")
with user_errors():
    fit_summary, fit_figure = _scale_fits(results_key(), layer.name, fmt.name if fmt.is_block_scaled else "",
                                          layer.weight)
st.plotly_chart(fit_figure, key="c_fit")
st.dataframe(fit_summary, hide_index=True, width="stretch")
download_table(fit_summary, "clipping_block_scale_fit")
