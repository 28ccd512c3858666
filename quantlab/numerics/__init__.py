"""Number formats and the arithmetic of quantization: no models, no data.

formats     QuantFormat / Granularity: what a format is and exactly how many bits it stores
kernels     elementwise encode/decode (eager, or fused with torch.compile)
primitives  choose_qparams / quantize / dequantize / fake_quantize over (rows, groups, group) blocks
packing     dense bit-packing of codes into bytes and int32 words
measures    relative output and weight errors of a quantized weight (from H or from X)

May import: torch, quantlab.errors, quantlab.device. Nothing else of quantlab.
"""
