"""What quantization does, as plain numbers, arrays and DataFrames: the data of the app's pages.

Nothing here draws or imports streamlit: ``quantlab.analysis.plots`` turns these results into figures and
the pages only lay them out.

    tensors     the playground's vector, a layer's weights and grid, clipping sweeps
    sizes       bits per weight and bytes per format, for a model and for 1B/7B/70B references
    outliers    per-channel magnitudes of weights and activations, top-k outliers, kurtosis
    runs        sweep tables, the Pareto front, per-layer errors and sensitivity, generations
    stored      a pre-quantized checkpoint's layer as stored: the codes it uses and its scales
"""
