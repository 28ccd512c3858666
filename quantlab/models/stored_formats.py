"""Which reader opens a pre-quantized checkpoint, decided from its config before any weight is read.

Two routes, chosen by ``route_for(config)`` for ``loading.load_model``:

- NVFP4/MXFP4 folders (``nvfp4-`` / ``mxfp4-pack-quantized``, QuantLab's own exports among them)
  decompress through transformers + compressed-tensors: the loader gets a
  ``CompressedTensorsConfig(run_compressed=False)`` and returns plain linears with dense weights.
- The integer compressed-tensors formats, GPTQ (qweight/qzeros/scales/g_idx) and AWQ (GEMM) go
  through QuantLab's own reader (:mod:`quantlab.models.prequantized`): the format is checked first
  (an unreadable one is one line), the plain architecture is built without the quantization config,
  and the stored codes are dequantized into it (``fill``).

A checkpoint without a quantization config takes neither route.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from quantlab.models.prequantized import StoredQuantization, check_supported, fill_dequantized, quantization_config

FP4_CHECKPOINT_FORMATS = ("nvfp4-pack-quantized", "mxfp4-pack-quantized")


def quant_format(config) -> str | None:
    """``quantization_config.format`` of a transformers config (a dict or a config object), else None."""
    qc = getattr(config, "quantization_config", None)
    return (qc.get("format") if isinstance(qc, dict) else getattr(qc, "format", None)) if qc is not None else None


def decompress_options(config) -> dict:
    """transformers ``from_pretrained`` options that decompress an NVFP4/MXFP4 checkpoint to dense weights
    (QuantLab quantizes and inspects plain linears); ``{}`` for every other checkpoint."""
    if quant_format(config) not in FP4_CHECKPOINT_FORMATS:
        return {}
    from transformers import CompressedTensorsConfig

    return {"quantization_config": CompressedTensorsConfig(run_compressed=False)}


@dataclass(frozen=True)
class StoredRoute:
    """How one checkpoint's stored quantization is opened."""

    qconfig: dict | None = None  # set: QuantLab's reader fills the dequantized weights after loading
    loader_options: dict = field(default_factory=dict)  # set: the library decompresses while loading

    @property
    def quiet(self) -> bool:
        """Hide transformers' missing-key report: with QuantLab's reader every quantized layer is in it."""
        return self.qconfig is not None


def route_for(config) -> StoredRoute:
    """The route for ``config``; for QuantLab's reader, checks the format and removes the quantization
    config from ``config`` (so transformers builds the plain architecture)."""
    options = decompress_options(config)
    qconfig = None if options else quantization_config(config)
    if qconfig is not None:
        check_supported(qconfig)  # an unreadable format is one line before any weight is read
        del config.quantization_config
    return StoredRoute(qconfig, options)


def fill(model: nn.Module, source: str, route: StoredRoute, missing_keys) -> tuple[StoredQuantization | None, list[str]]:
    """Dequantize the stored codes into ``model`` (QuantLab's route); the keys still missing after that."""
    stored = fill_dequantized(model, source, route.qconfig) if route.qconfig is not None else None
    filled = {f"{name}.weight" for name in stored.layers} if stored else set()
    return stored, sorted(set(missing_keys or ()) - filled)


def finish(model: nn.Module, route: StoredRoute, torch_dtype: torch.dtype) -> None:
    """compressed-tensors decompresses FP4 weights to bf16 whatever dtype was asked; E2M1 values times
    their scales are exact in bf16, so the cast to the asked dtype is too."""
    if route.loader_options:
        model.to(torch_dtype)
