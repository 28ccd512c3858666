"""Weights: a layer's weight histogram with the format's grid on top, the error it leaves, its scales."""

import streamlit as st

from pages.common import (
    cached_view, current_format, current_matrices, current_model, download_table, explain, matrix_picker, results_key,
    user_errors,
)
from quantlab.analysis import plots
from quantlab.analysis import sizes, stored, tensors
from quantlab.models.prequantized import stored_layer
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


@cached_view(spinner="Reading the stored codes…")
def _stored(key: str, layer: str, _loaded, _weight) -> tuple:
    view = stored.stored_view(stored_layer(_loaded.source, _loaded.stored.qconfig, layer), _weight)
    return view, (
        plots.bar_figure(view.codes, "code", "count", f"{layer}: stored codes ({view.summary['scheme']})",
                         y_title="weights"),
        plots.histogram_figure(view.scales, "Stored scales", "scale"),
    )


def _stored_section(layer) -> None:
    """For a checkpoint that arrived quantized: the layer's codes and scales as the files hold them."""
    loaded = current_model()
    if loaded is None or loaded.stored is None or layer.name not in loaded.stored.layers:
        return
    st.subheader("As stored in the checkpoint")
    with user_errors():
        view, (codes_figure, scales_figure) = _stored(results_key(), layer.name, loaded, layer.weight)
    summary = view.summary
    cols = st.columns(3)
    cols[0].metric("Stored scheme", summary["scheme"])
    cols[1].metric("Codes used", f"{summary['codes_used']} ({summary['code_min']:g} … {summary['code_max']:g})")
    cols[2].metric("Scales stored", f"{summary['scales_stored']:,}")
    left, right = st.columns(2)
    left.plotly_chart(codes_figure, key="w_stored_codes")
    right.plotly_chart(scales_figure, key="w_stored_scales")
    st.caption(f"Read from the files ({loaded.stored.method}, {loaded.stored.layout}), not re-quantized: the model "
               f"holds (q - z)·s of these codes (largest difference {summary['max_abs_difference']:.2g}, the "
               "rounding of its dtype). The views below apply the sidebar's format to those dequantized weights, "
               "a second quantization on top of the stored one.")
    download_table(view.codes, "stored_codes", key="w_stored_dl")


st.title("Weights")
st.write("Every weight is moved to the nearest value of its group's grid. The histogram shows where the weights "
         "are and where the grid puts them; the error histogram shows what that costs.")
fmt = current_format()
matrices = current_matrices()
layer = matrix_picker(matrices, key="w_layer")
_stored_section(layer)
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
