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
    # a forward hook sees the arguments after every pre-hook, the online rotation included
    handle = model.get_submodule(path).register_forward_hook(lambda m, args, out: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    return captured[0].float().reshape(-1, captured[0].shape[-1])


# The linears whose inputs the rotation changes (Llama names): q_proj reads the rotated residual
# stream, RMSNorm(x Q) with the norm's weight folded into q_proj; down_proj reads act(gate) * up
# rotated online by its Hadamard transform.
ROTATED_INPUTS = {"q_proj": "self_attn.q_proj", "down_proj": "mlp.down_proj"}


def rotation_channels(model: nn.Module, ids: torch.Tensor, block: int = 0, seed: int = 0,
                      linear: str = "q_proj") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per channel absmax before/after, summary) of what block ``block``'s ``linear`` (a key of
    ``ROTATED_INPUTS``) multiplies, before and after ``rotate_model`` (residual + down-projections)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not 0 <= block < len(layers):
        raise FormatError(f"block {block} is not a block of this Llama-style model")
    if linear not in ROTATED_INPUTS:
        raise FormatError(f"no rotated input {linear!r}; choose one of {', '.join(ROTATED_INPUTS)}")
    path = f"model.layers.{block}.{ROTATED_INPUTS[linear]}"
    rotated = rotate_model(model, seed)
    # The hook sees what the weight multiplies: after RMSNorm (whose weight is folded into q_proj in
    # the rotated copy), and after down_proj's online transform (a pre-hook that runs first).
    before, after = _inputs_of(model, path, ids), _inputs_of(rotated, path, ids)
    channels = pd.DataFrame({"channel": range(before.shape[1]), "before": before.abs().amax(0).numpy(),
                             "after": after.abs().amax(0).numpy()})
    summary = pd.DataFrame([
        {"input": label, "excess kurtosis": excess_kurtosis(x), "largest channel / median channel":
         float(x.abs().amax(0).max() / x.abs().amax(0).median())}
        for label, x in (("before rotation", before), ("after rotation", after))
    ])
    return channels, summary
