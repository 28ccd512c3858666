"""Calibration: run real tokens through the model block by block and gather what the algorithms need.

runner       calibration sets and the block-sequential runner (one block copied at a time)
inputstats   per-linear input statistics: channel magnitudes and GPTQ's Hessian H = 2XᵀX/n
activations  activation quantization (dynamic per-token, static observers) for W8A8
distributed  torchrun: calibration batches shared by ranks, exact fixed-order sums, work spread and broadcast

May import: quantlab.recipe, quantlab.models, quantlab.texts, quantlab.numerics and the ground floor.
"""
