"""Sizes: bits per weight and bytes of a model in many formats, and of Llama-shaped 1B/7B/70B models."""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import pandas as pd
from torch import nn

from quantlab.models.architectures import find_linears
from quantlab.errors import FormatError
from quantlab.numerics.formats import QuantFormat
from quantlab.models.gguf import GGUF_TYPES, GGUFType
from quantlab.models.sizing import REFERENCE_MODELS, ModelSize, model_size, reference_size
from quantlab.runs.speed import SpeedResult, ratios, theoretical_bytes
from quantlab.models.weightfiles import TensorListing

SIZE_FORMATS = ("int8", "int4-g32", "int4-g64", "int4-g128", "int4", "int3-g128", "fp8-e4m3", "nf4-g64")
SIZE_VARIANTS = ((True, "fp16"), (False, "fp16"), (True, "fp32"), (False, "fp32"))  # (symmetric, scale dtype)
# Scaled-block formats fix their own scale type, so they come once each, after the variants.
BLOCK_SIZE_FORMATS = ("mxfp4", "nvfp4", "mxfp6-e2m3", "mxfp8-e4m3", "fp8-block")


def size_variants(fmt_names: Sequence[str] = SIZE_FORMATS,
                  variants: Sequence[tuple[bool, str]] = SIZE_VARIANTS,
                  block_names: Sequence[str] = BLOCK_SIZE_FORMATS) -> list[QuantFormat]:
    """Each named format with and without zero-points and with each scale dtype (asym for ints only),
    then each scaled-block format with its own scales."""
    fmts = []
    for name in fmt_names:
        for symmetric, scale_dtype in variants:
            base = QuantFormat.parse(name, scale_dtype=scale_dtype)
            if symmetric or base.kind == "int":
                fmts.append(replace(base, symmetric=symmetric))
    return fmts + [QuantFormat.parse(name) for name in block_names]


def _size_row(size: ModelSize, fmt: QuantFormat) -> dict:
    return {
        "format": fmt.name, "zero_points": fmt.has_zero_point, "scale_dtype": fmt.scale_dtype,
        "bits_per_weight": size.bits_per_weight, "weight_bytes": size.weight_bytes, "scale_bytes": size.scale_bytes,
        "zero_point_bytes": size.zero_point_bytes, "full_precision_bytes": size.full_precision_bytes,
        "total_bytes": size.total_bytes, "compression": size.compression, "note": "",
    }


def format_sizes(model_or_listing, fmts: Sequence[QuantFormat]) -> pd.DataFrame:
    """One row per format: bits per weight and bytes of the whole model; formats that do not fit say why."""
    rows = []
    for fmt in fmts:
        try:
            rows.append(_size_row(model_size(model_or_listing, fmt), fmt))
        except FormatError as exc:
            rows.append({"format": fmt.name, "zero_points": fmt.has_zero_point, "scale_dtype": fmt.scale_dtype,
                         "note": str(exc)})
    return pd.DataFrame(rows)


def reference_sizes(fmts: Sequence[QuantFormat]) -> pd.DataFrame:
    """The same formats on Llama-shaped 1B, 7B and 70B models: the "7B at INT4 = 3.5 GB + scales" sum, exactly."""
    rows = []
    for label, n_params, hidden in REFERENCE_MODELS:
        for fmt in fmts:
            size = reference_size(n_params, fmt, hidden=hidden)
            rows.append({"model": label, "hidden": hidden, **_size_row(size, fmt),
                         "quantized_params": size.quantized_params, "fp16_bytes": size.original_bytes})
    return pd.DataFrame(rows).drop(columns="note")


GGUF_NOTE = "size reference: llama.cpp block layout, quality not simulated"


def _gguf_row(kind: GGUFType, size: ModelSize) -> dict:
    """``kind`` on the linears that ``size`` quantizes, the kept layers as ``size`` counts them."""
    quantized = [layer for layer in size.layers if layer.quantized]
    if any(layer.shape[-1] % kind.block_size for layer in quantized):
        return {"format": f"gguf-{kind.name}", "block_values": kind.block_size, "block_bytes": kind.block_bytes,
                "bits_per_weight": kind.bits_per_weight,
                "note": f"rows are not whole {kind.block_size}-value blocks: {kind.name} cannot store this model"}
    # A quantized layer may stand for n identical ones (the reference models' "q (x32)"): params / one's numel.
    n_bytes = sum(kind.tensor_bytes(*layer.shape) * (layer.params // (layer.shape[0] * layer.shape[1]))
                  for layer in quantized)
    total = n_bytes + size.full_precision_bytes
    return {"format": f"gguf-{kind.name}", "block_values": kind.block_size, "block_bytes": kind.block_bytes,
            "bits_per_weight": 8 * n_bytes / size.quantized_params, "weight_bytes": n_bytes,
            "full_precision_bytes": size.full_precision_bytes, "total_bytes": total,
            "compression": size.original_bytes / total, "note": GGUF_NOTE}


def gguf_sizes(model_or_listing) -> pd.DataFrame:
    """llama.cpp's Q8_0, Q4_0, Q4_K, Q5_K, Q6_K on this model's linears: exact bytes of the published blocks.

    Every linear inside the blocks in the one type, embeddings, norms and head kept as in the other
    rows (llama.cpp's own mixes such as Q4_K_M also quantize the embeddings and mix types per layer).
    """
    size = model_size(model_or_listing, QuantFormat.parse("int8"))  # which tensors are quantized, which kept
    return pd.DataFrame([_gguf_row(kind, size) for kind in GGUF_TYPES])


def gguf_reference_sizes() -> pd.DataFrame:
    """The GGUF types on the Llama-shaped 1B, 7B and 70B models of :func:`reference_sizes`."""
    rows = []
    for label, n_params, hidden in REFERENCE_MODELS:
        size = reference_size(n_params, QuantFormat.parse("int8"), hidden=hidden)
        rows += [{"model": label, "hidden": hidden, **_gguf_row(kind, size), "quantized_params": size.quantized_params,
                  "fp16_bytes": size.original_bytes} for kind in GGUF_TYPES]
    return pd.DataFrame(rows)


def layer_table(listing: TensorListing, size: ModelSize) -> pd.DataFrame:
    """Every stored tensor: shape, dtype, bytes, role, and its bytes in the format of ``size``."""
    dtypes = {t.name: t.dtype for t in listing.tensors}
    rows = []
    for layer in size.layers:
        name = layer.name if layer.name in dtypes or not layer.quantized else f"{layer.name}.weight"
        rows.append({
            "name": name, "role": layer.role, "shape": "x".join(map(str, layer.shape)), "dtype": dtypes.get(name, ""),
            "params": layer.params, "bytes": layer.fp_bytes, "quantized": layer.quantized,
            f"bytes_{size.fmt_name}": layer.quant_bytes,
        })
    return pd.DataFrame(rows)


def model_summary(model: nn.Module, kind: str) -> dict:
    """Architecture facts for the Model page: class, type, blocks, widths, parameters, dtype, device."""
    config = getattr(model, "config", None)
    linears = find_linears(model)
    first = next(model.parameters())
    return {
        "class": type(model).__name__, "model_type": getattr(config, "model_type", "?"), "kind": kind,
        "blocks": len({info.block for info in linears}), "hidden_size": getattr(config, "hidden_size", None),
        "quantizable_linears": len(linears), "linear_params": sum(info.numel for info in linears),
        "parameters": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        "dtype": str(first.dtype).removeprefix("torch."), "device": str(first.device),
    }


def speed_table(results: Sequence[SpeedResult], model: nn.Module) -> pd.DataFrame:
    """Measured latency and memory of each kernel variant next to QuantLab's computed size of it."""
    relative = ratios(list(results))
    return pd.DataFrame([{
        "variant": r.variant, "device": r.device, "backend": r.backend, "label": r.label,
        "prefill_ms_per_token": r.prefill_ms_per_token, "decode_ms_per_token": r.decode_ms_per_token,
        "prefill_vs_baseline": relative[r.variant]["prefill"], "decode_vs_baseline": relative[r.variant]["decode"],
        "measured_memory_mib": r.resident_bytes / 2**20, "tensor_mib": r.tensor_bytes / 2**20,
        "computed_mib": theoretical_bytes(model, r.variant) / 2**20,
    } for r in results])
