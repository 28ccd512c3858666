"""Post-training quantization algorithms: pure functions from weights and statistics to results.

The shared configuration and result dataclasses live in :mod:`quantlab.recipe`; ``rtn`` and ``gptq`` quantize one
weight matrix each; ``awq`` and ``smoothquant`` search per-channel scales for a whole block. The
block-sequential runner that feeds them lives in :mod:`quantlab.calibrate.runner`, the dispatch in
:mod:`quantlab.runs.pipeline`.
"""
