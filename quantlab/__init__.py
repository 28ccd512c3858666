"""QuantLab: real post-training quantization of language models, and what it does to them.

Layers (each imports only from the ones above it):

    errors, device          error types, device choice
    formats                 QuantFormat / Granularity: number formats and their exact sizes
    kernels                 elementwise encode/decode, eager or fused with torch.compile
    primitives, packing     quantize / dequantize / fake_quantize; bit-packing of codes
    corpus, architectures   the offline text corpus; where each architecture's linears are
    models                  load a hub id / folder / safetensors file; size accounting
    evaluation              perplexity, KL, encoder fidelity, the lm-eval bridge
    calibration             calibration sets, block-sequential runner, activation statistics
    algorithms/             rtn, gptq, awq, smoothquant, kv-cache: pure functions -> results
    analysis, plots         arrays / DataFrames for the app, and plotly figures of them
    cli/                    the command line (python -m quantlab ...)

The Streamlit app (app.py, pages/) sits on top and is the only place that imports streamlit.
"""

__version__ = "0.1.0"
