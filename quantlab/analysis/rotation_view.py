"""Before and after a Hadamard rotation: the same layer's input channels, their magnitudes and kurtosis."""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from quantlab.algorithms.rotation import rotate_model
from quantlab.analysis.outliers import excess_kurtosis
from quantlab.errors import FormatError


def _inputs_of(model: nn.Module, path: str, ids: torch.Tensor) -> torch.Tensor:
    """The input of module ``path`` on ``ids``, as (tokens, channels) fp32."""
    captured = []
    handle = model.get_submodule(path).register_forward_hook(lambda m, args, out: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    return captured[0].float().reshape(-1, captured[0].shape[-1])


def rotation_channels(model: nn.Module, ids: torch.Tensor, block: int = 0, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per channel absmax before/after, summary) of block ``block``'s q_proj input, which the rotation
    changes from RMSNorm(x) to RMSNorm(x Q) with the norm's weight folded into q_proj."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not 0 <= block < len(layers):
        raise FormatError(f"block {block} is not a block of this Llama-style model")
    path = f"model.layers.{block}.self_attn.q_proj"
    rotated = rotate_model(model, seed)
    # What q_proj multiplies: RMSNorm's output; folding moves its weight into q_proj, so compare
    # like with like: the original input times the norm weight's effect is already in it.
    before, after = _inputs_of(model, path, ids), _inputs_of(rotated, path, ids)
    channels = pd.DataFrame({"channel": range(before.shape[1]), "before": before.abs().amax(0).numpy(),
                             "after": after.abs().amax(0).numpy()})
    summary = pd.DataFrame([
        {"input": label, "excess kurtosis": excess_kurtosis(x), "largest channel / median channel":
         float(x.abs().amax(0).max() / x.abs().amax(0).median())}
        for label, x in (("before rotation", before), ("after rotation", after))
    ])
    return channels, summary
