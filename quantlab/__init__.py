"""QuantLab: real post-training quantization of language models, and what it does to them.

Layers, lowest first (each imports only from the ones above it in this list; tests/test_layers.py):

    errors, device   error types, device choice (the ground floor)
    numerics/        formats, kernels, primitives, packing: number formats and their arithmetic
    models/          weight files, architectures table, loading, sizing, quantized modules
    texts/           the offline corpus, WikiText-2, user text files
    recipe           run configurations, configuration names, LayerResult / RunResult
    evaluation/      perplexity, KL, encoder fidelity, the lm-eval bridge
    calibrate/       calibration sets, block-sequential runner, input statistics, activation observers
    algorithms/      rtn, gptq, awq, smoothquant, kv-cache: pure functions -> results
    runs/            pipeline, records, export, speed: a run end to end
    analysis/        arrays / DataFrames for the app, and plotly figures of them (plots)
    bundled/         the bundled model's training and report
    cli/             the command line (python -m quantlab ...)

The Streamlit app (app.py, pages/) sits on top and is the only place that imports streamlit.
"""

__version__ = "0.1.0"
