"""A run end to end: quantize a model, score it, save the record, export it, time it.

pipeline  quantize_model / run_sweep: configuration names in, RunResults out
records   self-describing JSON run and sweep records (and the sweeps shipped in assets/)
export    compressed-tensors folders a user can load elsewhere
speed     measured prefill / decode speed and memory of quantized kernels

May import: everything below it (algorithms, calibrate, evaluation, models, texts, numerics, recipe).
"""
