"""Weights: a layer's weight histogram with the format's grid on top, the error it leaves, its scales."""

import streamlit as st

from pages.common import (
    cached_view, current_format, current_matrices, download_table, explain, matrix_picker, results_key, user_errors,
)
from quantlab.analysis import plots
from quantlab.analysis import sizes, tensors
from quantlab.numerics.formats import QuantFormat


@cached_view(spinner="Quantizing the layer…")
def _views(key: str, layer: str, fmt_repr: str, which: str, _W, _fmt) -> tuple:
    views = tensors.weight_views(_W, _fmt, which)
    row, group = views.block
    return views, (
        plots.histogram_figure(views.weights, f"{layer}: weights and the grid of block (row {row}, group {group})",
                               "weight value", views.levels, log_y=True),
        plots.histogram_figure(views.errors, "Quantization error x̂ - x", "error"),
        plots.histogram_figure(views.scales, "Scales of all blocks", "scale"),
    )


@cached_view()
def _comparison(key: str, layer: str, fmt_reprs: tuple, _W, _fmts) -> tuple:
    figure = plots.overlaid_histograms_figure(tensors.error_histograms(_W, _fmts), "Error of each format, same axis",
                                              "error")
    return tensors.format_comparison(_W, _fmts), figure


st.title("Weights")
st.write("Every weight is moved to the nearest value of its group's grid. The histogram shows where the weights "
         "are and where the grid puts them; the error histogram shows what that costs.")
fmt = current_format()
matrices = current_matrices()
layer = matrix_picker(matrices, key="w_layer")
which = st.radio("Overlay the grid of the block with the", ("largest", "median"), horizontal=True, key="w_block",
                 format_func=lambda w: f"{w} scale")
with user_errors():
    views, (weights_figure, error_figure, scales_figure) = _views(results_key(), layer.name, repr(fmt), which,
                                                                  layer.weight, fmt)

summary = views.summary
cols = st.columns(4)
cols[0].metric("Bits per weight", f"{summary['bits_per_weight']:.3f}")
cols[1].metric("Relative error", f"{summary['relative_error']:.2e}")
cols[2].metric("SQNR", f"{summary['sqnr_db']:.1f} dB",
               help="Signal-to-quantization-noise ratio: 10 log10(|W|² / |W - Ŵ|²)")
cols[3].metric("Clipped", f"{summary['clipped_fraction']:.2%}")
explain("bits per weight")

st.plotly_chart(weights_figure, key="w_hist")
st.caption("Each group has its own scale, so its own grid: the orange lines are one block's grid. Counts are on a "
           "log scale so that the rare large weights (outliers) stay visible.")
left, right = st.columns(2)
with left:
    st.plotly_chart(error_figure, key="w_err")
with right:
    st.plotly_chart(scales_figure, key="w_scales")
    explain("scale")
download_table(views.histograms(), "weights_histograms")

st.subheader("Before and after: two formats")
names = [fmt.name, *[n for n in (*sizes.SIZE_FORMATS, *sizes.BLOCK_SIZE_FORMATS) if n != fmt.name]]
other_name = st.selectbox("Compare the sidebar's format with", names[1:], index=2, key="w_other")
with user_errors():
    other = QuantFormat.parse(other_name)
    if not (other.is_block_scaled or fmt.is_block_scaled):  # block formats fix their own scale type
        other = QuantFormat.parse(other_name, scale_dtype=fmt.scale_dtype)
    table, comparison_figure = _comparison(results_key(), layer.name, (repr(fmt), repr(other)), layer.weight,
                                           (fmt, other))
st.plotly_chart(comparison_figure, key="w_cmp")
st.dataframe(table, hide_index=True, width="stretch")
download_table(table, "weights_format_comparison")
