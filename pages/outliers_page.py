"""Outliers: the channels of weights and activations that stretch the scales, and what AWQ/SmoothQuant do."""

import streamlit as st

from pages.common import (
    cached_view, current_matrices, current_model, download_table, explain, matrix_picker, model_choice,
    page_uploader, progress_callback, results_key, user_errors,
)
from pages.runs import result_store
from quantlab.analysis import plots
from quantlab.recipe import CalibConfig
from quantlab.analysis import outliers, rotation_view
from quantlab.calibrate.runner import calibration_set

CALIB = CalibConfig(n_samples=8, seq_len=128)  # a quick pass: channel maxima settle within a few thousand tokens
MARKS = {"awq_protects": "AWQ scales up (salient)", "smoothquant_migrates": "SmoothQuant migrates"}


@cached_view(spinner="Rotating a copy of the model…")
def _rotation(key: str, block: int, linear: str, _loaded) -> tuple:
    ids = calibration_set(_loaded.tokenizer, CalibConfig(n_samples=4, seq_len=128, source="heldout"))
    channels, summary = rotation_view.rotation_channels(_loaded.model, ids, block, linear=linear)
    figure = plots.overlaid_histograms_figure(
        {"before": channels.assign(center=channels["channel"], count=channels["before"]),
         "after": channels.assign(center=channels["channel"], count=channels["after"])},
        f"Block {block} {linear} input: largest |x| per channel", "channel", "largest |x|")
    return channels, summary, figure


def _activation_stats(key: str, loaded, progress):
    store = result_store("activation stats", 4)
    return store.get((key, CALIB), lambda: outliers.activation_stats(loaded, CALIB, progress))


@cached_view()
def _channels(key: str, source: str, axis: str, role: str, k: int, _matrices, _stats) -> tuple:
    chosen = [m for m in _matrices if role == "all" or m.role == role]
    vectors = outliers.channel_vectors(chosen, axis, _stats if source == "activations" else None)
    z, labels = outliers.heatmap_matrix(vectors)
    figure = plots.heatmap_figure(z, labels, f"{source.capitalize()}: largest |value| per {axis} channel",
                                  f"{axis} channel")
    return figure, outliers.top_outliers(vectors, k, source.removesuffix("s"))


@cached_view()
def _layer(key: str, name: str, source: str, axis: str, _matrix, _stats) -> tuple:
    table = outliers.layer_channels(_matrix, axis, _stats)
    column = "activation_absmax" if source == "activations" else "weight_absmax"
    marks = MARKS if "awq_protects" in table else None
    return table, plots.channel_figure(table, column, f"{name}: {column.replace('_', ' ')} per {axis} channel", marks)


@cached_view()
def _kurtosis(key: str, with_stats: bool, _matrices, _stats) -> tuple:
    table = outliers.kurtosis_table(_matrices, _stats)
    short = table.assign(layer=[plots.short_name(n) for n in table["layer"]])
    return table, plots.bar_figure(short, "layer", "weight_kurtosis", "Weight kurtosis per layer")


st.title("Outliers")
explain("outlier")
st.write("A shared scale is set by the largest value it covers. One channel ten times larger than the rest "
         "leaves every other channel with a tenth of the grid. Here are the channels that do that.")
with st.expander("Inspect your own checkpoint", expanded=model_choice() is None):
    st.caption("A .safetensors file of weights (a model's, or one shard of it): it becomes the sidebar's model, "
               "for this page and the other weight pages, and is removed when your session ends.")
    page_uploader("o_upload")
if model_choice() is None:
    st.info("Choose a model in the sidebar, or upload a checkpoint above.")
    st.stop()
matrices = current_matrices()
loaded = current_model()
key = results_key()
stats = None
if loaded is None:
    st.caption("Weights file: weight views only (activations need a model that runs).")
elif st.toggle("Include activations (runs a calibration pass)", key="o_acts", value=True):
    explain("calibration")
    with user_errors(), st.status("Calibration pass: recording every linear's inputs…", expanded=False) as status:
        stats = _activation_stats(key, loaded, progress_callback(status))
        status.update(label=f"Calibration: {CALIB.n_samples} x {CALIB.seq_len} tokens of the bundled training text",
                      state="complete")

left, right = st.columns(2)
source = left.radio("Show", ("activations", "weights") if stats else ("weights",), horizontal=True, key="o_source")
axis = right.radio("Channels", ("input", "output") if source == "weights" else ("input",), horizontal=True,
                   key="o_axis", help="Input channels are a weight's columns (what an activation channel multiplies); "
                                      "output channels its rows.")
roles = sorted({m.role for m in matrices})
role = st.selectbox("Layers with role", ["all", *roles], index=1 + roles.index("down") if "down" in roles else 0,
                    key="o_role")
k = st.slider("Top outlier channels to list", 5, 50, 10, key="o_k")
with user_errors():
    heatmap, top = _channels(f"{key}#{stats is not None}", source, axis, role, k, matrices, stats)
st.plotly_chart(heatmap, key="o_heatmap")

st.subheader("Top outlier channels")
st.caption("Ratio to median: how many times larger than the layer's typical channel.")
st.dataframe(top, hide_index=True, width="stretch")
download_table(top, "outlier_channels")

st.subheader("Within one layer")
st.caption("Opens on the layer that holds the top outlier channel above.")
layer = matrix_picker([m for m in matrices if role == "all" or m.role == role], key="o_layer",
                      default_name=top["layer"].iloc[0] if len(top) else None)
with user_errors():
    table, layer_figure = _layer(f"{key}#{stats is not None}", layer.name, source, axis, layer,
                                 stats.get(layer.name) if stats else None)
st.plotly_chart(layer_figure, key="o_layer_chart")
if "awq_protects" in table:
    st.caption(f"Marked: the {outliers.PROTECT_SHARE:.0%} of input channels AWQ would give the finest grid "
               "(largest mean |x|^α) and SmoothQuant would divide most (largest max|X|^α / max|W|^(1-α), α = 0.5).")
download_table(table, "outlier_layer_channels")

st.subheader("Kurtosis per layer")
st.caption("Excess kurtosis is 0 for a bell curve and grows when a few values dominate: heavy tails, outliers.")
kurtosis, kurtosis_figure = _kurtosis(key, stats is not None, matrices, stats)
st.plotly_chart(kurtosis_figure, key="o_kurtosis")
st.dataframe(kurtosis, hide_index=True, width="stretch")
download_table(kurtosis, "outlier_kurtosis")

st.subheader("Hadamard rotation: before and after")
st.write("A randomized Hadamard rotation (QuaRot: the `rot-` configurations) computes the same function but "
         "spreads every channel over all the others: the residual stream, fused into the weights (what q_proj "
         "reads), and down_proj's input, rotated online with its inverse fused into down_proj. One block's "
         "inputs before and after, on held-out text. Llama-style models only.")
loaded_model = current_model()
block_count = len(getattr(getattr(loaded_model.model, "model", None), "layers", [])) if loaded_model else 0
left, right = st.columns(2)
block = int(left.number_input("Block", 0, max(block_count - 1, 0), 0, key="o_rot_block", disabled=not block_count))
rotated_input = right.radio("Input of", tuple(rotation_view.ROTATED_INPUTS), horizontal=True, key="o_rot_linear",
                            disabled=not block_count)
if block_count and st.button("Rotate a copy and compare", key="o_rotate"):
    with user_errors():
        channels, summary, figure = _rotation(results_key(), block, rotated_input, loaded_model)
    st.plotly_chart(figure, key="o_rot_chart")
    st.dataframe(summary, hide_index=True, width="stretch")
    download_table(channels, "outlier_rotation_channels")
