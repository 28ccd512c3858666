"""Models and their files: opening, describing, sizing, and the quantized modules that replace linears.

weightfiles   safetensors headers and tensors (validated, memory-mapped), sharded indexes, safe pickles
architectures the per-architecture table: which linears form a block, which norm feeds which
loading       hub id / local folder / bare safetensors -> a loaded model (shared, never modified)
sizing        exact storage accounting of a checkpoint under a format, from headers only
quantized     QuantizedLinear: integer codes + scales that run as a torch module

May import: quantlab.numerics, quantlab.errors, quantlab.device, torch, transformers, safetensors.
"""
