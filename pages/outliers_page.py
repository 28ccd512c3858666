"""Outliers: the channels of weights and activations that stretch the scales, and what AWQ/SmoothQuant do."""

import streamlit as st

from pages.common import (
    current_matrices, current_model, download_table, explain, matrix_picker, progress_callback, result_store,
    results_key, user_errors,
)
from quantlab import plots
from quantlab.algorithms.base import CalibConfig
from quantlab.analysis import outliers

CALIB_SAMPLES, CALIB_LEN = 8, 128  # a quick pass: channel maxima settle within a few thousand tokens


def _activation_stats(key: str, loaded, progress):
    calib = CalibConfig(n_samples=CALIB_SAMPLES, seq_len=CALIB_LEN)
    store = result_store("activation stats", 4)
    return store.get((key, calib), lambda: outliers.activation_stats(loaded, calib, progress))


st.title("Outliers")
explain("outlier")
st.write("A shared scale is set by the largest value it covers. One channel ten times larger than the rest "
         "leaves every other channel with a tenth of the grid. Here are the channels that do that.")
matrices = current_matrices()
loaded = current_model()
stats = None
if loaded is None:
    st.caption("Weights file: weight views only (activations need a model that runs).")
elif st.toggle("Include activations (runs a calibration pass)", key="o_acts", value=True):
    explain("calibration")
    with user_errors(), st.status("Calibration pass: recording every linear's inputs…", expanded=False) as status:
        stats = _activation_stats(results_key(), loaded, progress_callback(status))
        status.update(label=f"Calibration: {CALIB_SAMPLES} x {CALIB_LEN} tokens of the bundled training text",
                      state="complete")

left, right = st.columns(2)
source = left.radio("Show", ("activations", "weights") if stats else ("weights",), horizontal=True, key="o_source")
axis = right.radio("Channels", ("input", "output") if source == "weights" else ("input",), horizontal=True,
                   key="o_axis", help="Input channels are a weight's columns (what an activation channel multiplies); "
                                      "output channels its rows.")
roles = sorted({m.role for m in matrices})
role = st.selectbox("Layers with role", ["all", *roles], index=1 + roles.index("down") if "down" in roles else 0,
                    key="o_role")
chosen = [m for m in matrices if role == "all" or m.role == role]
vectors = outliers.channel_vectors(chosen, axis, stats if source == "activations" else None)

with user_errors():
    z, labels = outliers.heatmap_matrix(vectors)
st.plotly_chart(plots.heatmap_figure(z, labels, f"{source.capitalize()}: largest |value| per {axis} channel",
                                     f"{axis} channel"), key="o_heatmap")

st.subheader("Top outlier channels")
k = st.slider("How many", 5, 50, 10, key="o_k")
top = outliers.top_outliers(vectors, k, source[:-1])
st.dataframe(top, hide_index=True, width="stretch")
download_table(top, "outlier_channels")

st.subheader("Within one layer")
layer = matrix_picker(chosen, key="o_layer")
with user_errors():
    table = outliers.layer_channels(layer, axis, stats.get(layer.name) if stats else None)
column = "activation_absmax" if source == "activations" else "weight_absmax"
marks = {"awq_protects": "AWQ scales up (salient)", "smoothquant_migrates": "SmoothQuant migrates"} \
    if "awq_protects" in table else None
st.plotly_chart(plots.channel_figure(table, column, f"{layer.name}: {column.replace('_', ' ')} per {axis} channel",
                                     marks), key="o_layer_chart")
if marks:
    st.caption(f"Marked: the {outliers.PROTECT_SHARE:.0%} of input channels AWQ would give the finest grid "
               "(largest mean |x|^α) and SmoothQuant would divide most (largest max|X|^α / max|W|^(1-α), α = 0.5).")
download_table(table, "outlier_layer_channels")

st.subheader("Kurtosis per layer")
st.caption("Excess kurtosis is 0 for a bell curve and grows when a few values dominate: heavy tails, outliers.")
kurtosis = outliers.kurtosis_table(matrices, stats)
st.plotly_chart(plots.bar_figure(kurtosis.assign(layer=[plots.short_name(n) for n in kurtosis["layer"]]), "layer",
                                 "weight_kurtosis", "Weight kurtosis per layer"), key="o_kurtosis")
st.dataframe(kurtosis, hide_index=True, width="stretch")
download_table(kurtosis, "outlier_kurtosis")
