"""A pre-quantized checkpoint's layer as stored: which codes it uses, how often, and its scales.

The Weights page shows this for a checkpoint that arrived quantized (GPTQ, AWQ, compressed-tensors):
the codes and scales read from the files, not a re-quantization of the dequantized weights. A
symmetric INT4 layer stored by compressed-tensors uses codes -8..7; a GPTQ/AWQ layer stores
unsigned codes 0..15 around its zero-points.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from quantlab.analysis.tensors import histogram
from quantlab.models.prequantized import StoredLayer
from quantlab.models.weightfiles import list_files, weight_files


@dataclass(frozen=True)
class StoredView:
    """Tables of one stored layer: code counts, the stored scales' histogram, and a summary."""

    codes: pd.DataFrame  # code, count, share: one row per code value the layer uses
    scales: pd.DataFrame  # histogram of the stored scales (one per channel / group / block)
    summary: dict  # scheme, codes used, code range, scales stored, max |loaded - dequantized|


def stored_view(layer: StoredLayer, loaded_weight: torch.Tensor | None = None) -> StoredView:
    """``layer``'s code usage and scales; with ``loaded_weight``, how far the model's weight is from
    the dequantized codes (0, or the rounding of the model's dtype: evaluation scores what is stored)."""
    values, counts = torch.unique(layer.codes.reshape(-1), return_counts=True)
    total = int(counts.sum())
    codes = pd.DataFrame({"code": values.numpy(), "count": counts.numpy().astype(int),
                          "share": (counts.double() / max(total, 1)).numpy()})
    summary = {
        "scheme": layer.scheme,
        "codes_used": len(values),
        "code_min": float(values.min()) if len(values) else float("nan"),
        "code_max": float(values.max()) if len(values) else float("nan"),
        "scales_stored": int(layer.scales.numel()),
    }
    if loaded_weight is not None:
        summary["max_abs_difference"] = float((loaded_weight.float() - layer.weight()).abs().max())
    return StoredView(codes, histogram(layer.scales), summary)


@dataclass(frozen=True)
class StoredSize:
    """What a pre-quantized checkpoint's files hold, from their headers: no re-quantization."""

    scheme: str  # the stored schemes, e.g. "int4-g128"
    layers: int  # linears stored quantized
    weights: int  # their weights
    layer_bytes: int  # codes + scales + zero-points (+ g_idx, shapes) of those layers, as stored
    file_bytes: int  # every tensor of the checkpoint

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.layer_bytes / max(self.weights, 1)

    def to_dict(self) -> dict:
        return {"stored scheme": self.scheme, "quantized layers": self.layers, "quantized weights": self.weights,
                "their bytes": self.layer_bytes, "bits per weight": round(self.bits_per_weight, 4),
                "checkpoint bytes": self.file_bytes}


def stored_size(loaded) -> StoredSize:
    """The stored bits of a pre-quantized ``LoadedModel``'s quantized layers, summed from the file headers."""
    listing = list_files(weight_files(Path(loaded.source)))
    layers = set(loaded.stored.layers)
    layer_bytes = sum(t.bytes for t in listing.tensors if t.name.rsplit(".", 1)[0] in layers)
    weights = sum(loaded.model.get_submodule(name).weight.numel() for name in layers)
    return StoredSize(", ".join(loaded.stored.schemes), len(layers), weights, layer_bytes, listing.total_bytes)
