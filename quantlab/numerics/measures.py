"""How far a quantized weight is from the original: relative output and weight errors, scale-free.

Shared by every method's per-layer report (``LayerResult``) and by the searches that pick scales
(AWQ). The output error ||X ΔWᵀ||² / ||X Wᵀ||² comes from H ∝ XᵀX or from the inputs X themselves,
whichever is cheaper; both divide by max |W| first so denormal weights do not underflow.
"""

from __future__ import annotations

import torch

def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """Relative output error ||X ΔWᵀ||² / ||X Wᵀ||² from H ∝ XᵀX, without the inputs themselves.

    ||X ΔWᵀ||²_F = tr(ΔW XᵀX ΔWᵀ), so any positive multiple of XᵀX (GPTQ's H = 2XᵀX/n included)
    gives the same ratio. W, W_hat: (out, in); H: (in, in), all in the same column order.
    """
    W, W_hat = _peak_normalised(W, W_hat)
    delta = W - W_hat  # (out, in)
    num = ((delta @ H) * delta).sum().item()
    den = ((W @ H) * W).sum().item()
    return num / den if den > 0 else 0.0


def output_error_from_inputs(W: torch.Tensor, W_hat: torch.Tensor, inputs: list[torch.Tensor]) -> float:
    """``output_error`` from the inputs X themselves (batches of (..., in)): the same ratio, exact in fp32.

    Two (tokens, in) x (in, out) products instead of two (out, in) x (in, in) ones: the cheaper way
    when the calibration set has fewer tokens than the layer has inputs (8 x 256 tokens through a
    14336-wide down_proj is 28x less work than going through H).
    """
    W, W_hat = _peak_normalised(W, W_hat)
    delta = W - W_hat  # (out, in)
    num = den = 0.0
    for batch in inputs:
        X = batch.reshape(-1, batch.shape[-1]).float()  # (tokens, in)
        num += (X @ delta.t()).pow(2).sum().item()
        den += (X @ W.t()).pow(2).sum().item()
    return num / den if den > 0 else 0.0


def weight_error(W: torch.Tensor, W_hat: torch.Tensor) -> float:
    """||W - Ŵ||² / ||W||²."""
    W, W_hat = _peak_normalised(W, W_hat)
    den = W.pow(2).sum().item()
    return (W - W_hat).pow(2).sum().item() / den if den > 0 else 0.0


def _peak_normalised(W: torch.Tensor, W_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both in fp32, divided by max |W|: the error ratios are scale-free, and this keeps them exact.

    Squares of denormal weights (below 1e-38) underflow to 0 in fp32: a layer quantized to all
    zeros would otherwise report no error at all.
    """
    peak = W.abs().amax().float().clamp_min(torch.finfo(torch.float32).tiny)
    return W.float() / peak, W_hat.float() / peak
