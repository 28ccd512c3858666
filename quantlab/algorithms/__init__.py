"""Post-training quantization algorithms: pure functions from weights and statistics to results.

``base`` holds the shared configuration and result dataclasses; ``rtn`` and ``gptq`` quantize one
weight matrix each; ``awq`` and ``smoothquant`` search per-channel scales for a whole block. The
block-sequential runner that feeds them lives in :mod:`quantlab.calibration`, the dispatch in
:mod:`quantlab.pipeline`.
"""
