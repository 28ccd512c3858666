"""Landing page: what QuantLab is and where to start."""

import streamlit as st

from pages.common import GLOSSARY

st.title("QuantLab")
st.write("See what **post-training quantization** does to a language model: real low-bit formats applied to real "
         "weights, with the error, the size and the quality measured, not simulated on a slide.")

st.markdown("""
**Start here**

1. **Model**: the layers of the chosen model and what each format would make it weigh.
2. **Playground**: the formulas on a vector you edit. No model needed; a good first stop for a workshop.
3. **Weights**: a layer's weight histogram with the quantization grid on top, and the error it leaves.
4. **Outliers**: the channels that stretch the scales, in weights and activations.
5. **Clipping**: trading a few clipped values for a finer grid.
6. **Size & scale overhead**: bits per weight and bytes, from this model up to 70B.
7. **Quality vs bits**: perplexity (or embedding fidelity) against size for a sweep of formats and methods; the
   measured sweep of the bundled model opens there in one click.
8. **Compare**: two or three configurations side by side, generations included.
9. **Mixed precision**: a format per layer under a size budget, planned from each layer's measured
   sensitivity, then run and measured next to the uniform formats.

Pick the model and the format in the sidebar; every page uses them.
""")

with st.expander("The words used on these pages"):
    for term, meaning in GLOSSARY.items():
        st.markdown(f"- **{term}**: {meaning}")

st.caption("Models: the bundled Python-stdlib Llama (trained by this project), the bundled all-MiniLM-L6-v2 encoder, "
           "any Hugging Face id when online, a local folder, or an uploaded safetensors file.")
