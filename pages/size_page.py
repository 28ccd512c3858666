"""Size and scale overhead: bits per weight and bytes per format, for this model and at 1B, 7B and 70B."""

import streamlit as st

from pages.common import (
    cached_view, current_model, download_table, explain, model_choice, results_key, user_errors,
)
from quantlab.models import loading as models
from quantlab.analysis import plots
from quantlab.runs import speed
from quantlab.analysis import sizes, stored

SPEED_SETTINGS = speed.SpeedSettings(prompt_tokens=64, decode_tokens=16, repeats=3)  # seconds, not minutes


def _variant(table):
    return table.assign(variant=table["zero_points"].map({True: "zero-points", False: "no zero-points"})
                        + ", " + table["scale_dtype"] + " scales")


@cached_view(spinner="Computing sizes…")
def _model_sizes(key: str, _source) -> tuple:
    table = _variant(sizes.format_sizes(_source, sizes.size_variants()))
    figure = plots.bar_figure(table[table["note"] == ""], "format", "bits_per_weight",
                              "Bits per weight, overhead included", color="variant",
                              y_title="bits per weight", horizontal=True)
    return table, figure


@st.cache_data(show_spinner="Measuring each kernel…", max_entries=4)
def _speed(key: str, _loaded):
    results = speed.measure_speed(_loaded.model, _loaded.kind, _loaded.name, settings=SPEED_SETTINGS)
    return sizes.speed_table(results, _loaded.model)


@cached_view()
def _reference_sizes():
    return _variant(sizes.reference_sizes(sizes.size_variants()))


@cached_view()
def _gguf_reference():
    return sizes.gguf_reference_sizes()


@cached_view()
def _reference_figure(model_label: str):
    chosen = _reference_sizes().query("model == @model_label").assign(GB=lambda d: d["total_bytes"] / 1e9)
    return plots.bar_figure(chosen, "format", "GB", f"{model_label} (Llama-shaped): total size by format",
                            color="variant", y_title="GB", horizontal=True)


st.title("Size & scale overhead")
explain("bits per weight")
st.write("A quantized weight costs its code bits, plus its share of the scale (and zero-point) it shares with its "
         "group. Smaller groups fit the weights better and cost more overhead; fp32 scales cost twice fp16's.")
st.latex(r"\text{bits per weight} = b + \frac{\text{scale bits} + \text{zero-point bits}}{g}"
         r"\qquad \text{INT4 g128, fp16 scales: } 4 + \tfrac{16}{128} = 4.125")
st.caption("Symmetric integers use the full signed range [-2^(b-1), 2^(b-1)-1] (INT4: codes -8..7, scale = "
           "absmax / 7.5), as compressed-tensors, llm-compressor and GPTQ store them; the restricted range "
           "(-7..7, absmax / 7; names ending -restricted) costs exactly the same bits, with one code left unused. "
           "Asymmetric: codes 0..2^b-1, scale = (max - min) / (2^b - 1), plus a b-bit zero-point per group.")

choice = model_choice()
if choice is None:
    st.info("Choose a model in the sidebar (or upload a safetensors file).")
    st.stop()
loaded = current_model()
with user_errors():
    source = loaded if loaded is not None else models.inspect_tensors(choice.weights_path)
    model_sizes, bits_figure = _model_sizes(results_key(), source)

st.subheader(f"This model: {loaded.name if loaded is not None else 'uploaded weights'}")
if loaded is not None and loaded.stored is not None:
    with user_errors():
        as_stored = stored.stored_size(loaded)
    st.markdown(f"**As stored** ({loaded.stored.method}, {loaded.stored.layout}): {as_stored.layers} layers in "
                f"{as_stored.scheme}, **{as_stored.bits_per_weight:.3f} bits per weight** counted from the files' "
                f"own tensors (codes, scales, zero-points), {as_stored.file_bytes / 2**20:,.1f} MiB in all. The "
                "table below re-quantizes the dequantized weights into each format, for comparison.")
    st.dataframe([as_stored.to_dict()], hide_index=True, width="stretch")
st.plotly_chart(bits_figure, key="size_bits")
st.caption("Layers kept in full precision (embeddings, norms, output head) are counted in every total at their "
           "stored size: in a small model they are most of the file.")
st.dataframe(model_sizes, hide_index=True, width="stretch")
download_table(model_sizes, "size_this_model")

st.subheader("The same formats at scale")
reference = _reference_sizes()
row = reference[(reference["model"] == "7B") & (reference["format"] == "int4-g128") & ~reference["zero_points"]
                & (reference["scale_dtype"] == "fp16")].iloc[0]
st.markdown(
    f"**7B at INT4 g128, fp16 scales**: {row['quantized_params'] / 1e9:.2f} B quantized weights x 4 bits = "
    f"**{row['weight_bytes'] / 1e9:.3f} GB** of codes, + {row['quantized_params'] / 128 / 1e6:.1f} M scales x 2 bytes "
    f"= **{row['scale_bytes'] / 1e9:.3f} GB** of scales, + **{row['full_precision_bytes'] / 1e9:.3f} GB** of "
    f"embeddings, head and norms in fp16 = **{row['total_bytes'] / 1e9:.2f} GB** in all "
    f"({row['bits_per_weight']:.3f} bits per quantized weight; fp16 would be {row['fp16_bytes'] / 1e9:.2f} GB).")
model_label = st.radio("Reference model", ("1B", "7B", "70B"), index=1, horizontal=True, key="size_ref")
st.plotly_chart(_reference_figure(model_label), key="size_ref_chart")
st.caption("Llama-shaped models (hidden 2048/4096/8192, untied embeddings and head in fp16); the parameter counts "
           "are approximate, the arithmetic on them exact.")
st.dataframe(reference, hide_index=True, width="stretch")
download_table(reference, "size_reference_models")

st.subheader("GGUF references (size only)")
st.write("llama.cpp's block types, sized exactly from the block structs in its `ggml-common.h`: **size "
         "references, quality not simulated**. Q8_0 = 32 int8 codes + an fp16 scale = 34 bytes per 32 values "
         "(8.5 bits); Q4_0 = 18 bytes per 32 (4.5); the K-quants pack 256 values into super-blocks with 6- or "
         "8-bit sub-block scales: Q4_K 144 bytes (4.5), Q5_K 176 (5.5), Q6_K 210 (6.5625).")
with user_errors():
    gguf_here = sizes.gguf_sizes(source)
st.dataframe(gguf_here, hide_index=True, width="stretch")
gguf_reference = _gguf_reference()
big = gguf_reference[gguf_reference["model"].isin(["7B", "70B"])].assign(GB=lambda d: d["total_bytes"] / 1e9)
st.dataframe(big[["model", "format", "bits_per_weight", "block_values", "block_bytes", "GB", "note"]],
             hide_index=True, width="stretch")
st.caption("Every linear of the blocks in the one type; embeddings, norms and head kept at 16 bits as in the "
           "rows above. llama.cpp's own mixes (Q4_K_M, Q5_K_S, ...) also quantize the embeddings and use "
           "different types per layer, so their files differ from these rows by a few percent.")
download_table(gguf_reference, "size_gguf_references")

st.subheader("Measured on this machine")
st.write("The sizes above are computed. Here real kernels run: on a CPU, PyTorch's int8 GEMMs (dynamic "
         "quantization of the linear layers) against fp32 and bf16; on a GPU, torchao's INT4 and FP8 kernels "
         "against bf16. Latency per token and memory are **measured**, labelled with the device.")
if loaded is None:
    st.info("Measuring speed needs a model that runs; choose one in the sidebar.")
elif st.button("Measure speed and memory", key="size_speed"):
    with user_errors():
        st.session_state["size_speed_result"] = results_key(), _speed(results_key(), loaded)
if loaded is not None and st.session_state.get("size_speed_result", (None,))[0] == results_key():
    measured = st.session_state["size_speed_result"][1]
    st.dataframe(measured, hide_index=True, width="stretch")
    download_table(measured, "size_measured_speed")
