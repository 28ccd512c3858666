"""Model: architecture, parameters, a per-layer table, and what each format would make it weigh."""

from pathlib import Path

import streamlit as st

from pages.common import (
    cached_view, current_format, current_model, download_table, explain, model_choice, results_key, user_errors,
)
from quantlab.models import loading as models
from quantlab.analysis import plots
from quantlab.analysis import sizes


@cached_view()
def _tables(key: str, fmt_repr: str, _source, _fmt) -> tuple:
    listing = models.inspect_tensors(_source)
    size = models.model_size(_source, _fmt)
    formats = sizes.format_sizes(_source, sizes.size_variants(variants=((True, _fmt.scale_dtype),)))
    fitting = formats.dropna(subset=["total_bytes"]).assign(MiB=lambda d: d["total_bytes"] / 2**20)
    figure = plots.bar_figure(fitting, "format", "MiB", "Whole model size by format", y_title="MiB")
    return listing.total_params, listing.total_bytes, sizes.layer_table(listing, size), formats, figure


st.title("Model")
choice = model_choice()
if choice is None:
    st.info("Choose a model in the sidebar (or upload a safetensors file).")
    st.stop()
fmt = current_format()
loaded = current_model()
with user_errors():
    source = loaded if loaded is not None else models.inspect_tensors(choice.weights_path)
    params, fp_bytes, layers, formats, sizes_figure = _tables(results_key(), repr(fmt), source, fmt)

if loaded is not None:
    summary = sizes.model_summary(loaded.model, loaded.kind)
    st.subheader(f"{loaded.name}: {summary['class']}")
    cols = st.columns(5)
    cols[0].metric("Parameters", f"{summary['parameters'] / 1e6:.2f} M")
    cols[1].metric("Kind", "causal LM" if loaded.kind == "causal" else "encoder")
    cols[2].metric("Blocks", summary["blocks"])
    cols[3].metric("Hidden size", summary["hidden_size"])
    cols[4].metric("Quantizable linears", summary["quantizable_linears"])
    st.caption(f"Stored as {summary['dtype']} on {summary['device']}. The linear layers inside the blocks hold "
               f"{summary['linear_params'] / summary['parameters']:.0%} of the parameters; they are what gets "
               "quantized. Embeddings, norms and the output head stay in full precision.")
else:
    st.subheader(f"Weights file: {choice.upload_name or Path(choice.weights_path).name}")
    st.caption("A bare safetensors file: its tensors are listed from the header; 2-D float matrices outside "
               "embeddings, norms and lm_head count as quantizable.")

cols = st.columns(3)
cols[0].metric("Stored tensors' parameters", f"{params / 1e6:.2f} M")
cols[1].metric("Full-precision size", f"{fp_bytes / 2**20:.2f} MiB")
chosen = formats[formats["format"] == fmt.name]
if len(chosen) and chosen["note"].iloc[0] == "":
    cols[2].metric(f"In {fmt.name}", f"{chosen['total_bytes'].iloc[0] / 2**20:.2f} MiB",
                   f"{chosen['bits_per_weight'].iloc[0]:.3f} bits per weight", delta_color="off")

st.subheader("What each format would weigh")
explain("bits per weight")
st.plotly_chart(sizes_figure, key="model_sizes")
st.dataframe(formats, hide_index=True, width="stretch")
download_table(formats, "model_format_sizes")

st.subheader("Every layer")
st.caption(f"Shape, dtype, bytes as stored, role in its block, and bytes in the sidebar's format ({fmt.name}).")
st.dataframe(layers, hide_index=True, width="stretch", height=360)
download_table(layers, "model_layers")
