"""Hadamard rotation of the residual stream, fused into the weights (QuaRot / SpinQuant's R1).

For an orthogonal Q (hidden x hidden), a pre-norm transformer computes exactly the same function when
the residual stream carries x Q instead of x: RMSNorm is rotation-invariant once its weight is folded
into the linears it feeds (||x Q|| = ||x||), every linear reading the stream becomes W Q, every
linear writing to it becomes Qᵀ W, the embedding E Q and the head W Q. Nothing runs online. A
randomized Hadamard matrix (random signs times a Hadamard matrix, over sqrt(n)) spreads each
channel over all the others, so the few huge residual channels that make INT4 per-channel and W4A8
hard are flattened before quantizing; any weight format then applies to the rotated copy.

Only the residual stream is rotated here (the down-projection's input would need an online
Hadamard in the forward pass: not done). The building block is compressed-tensors'
``random_hadamard_matrix``. Supported: Llama-style models (RMSNorm, pre-norm; ``ArchSpec`` pairs).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from quantlab.errors import FormatError

# Norm -> the linears it feeds, and the linears that write to the residual stream, per block.
_READERS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
_WRITERS = ("self_attn.o_proj", "mlp.down_proj")


def hadamard_rotation(size: int, seed: int = 0) -> torch.Tensor:
    """An orthogonal randomized Hadamard matrix (size, size) in float64."""
    from compressed_tensors.transform import random_hadamard_matrix

    H = random_hadamard_matrix(size, torch.float64, gen=torch.Generator().manual_seed(seed))
    return H / math.sqrt(size)  # the library's matrix has entries +-1 (times its signs): H Hᵀ = n I


def rotate_model(model: nn.Module, seed: int = 0) -> nn.Module:
    """A rotated deep copy of a Llama-style ``model``; the model itself is not modified."""
    if getattr(getattr(model, "config", None), "model_type", "") not in ("llama", "mistral", "qwen2", "qwen3"):
        raise FormatError("Hadamard rotation is implemented for Llama-style models (RMSNorm, pre-norm) only")
    rotated = copy.deepcopy(model)
    inner = rotated.model
    Q = hadamard_rotation(rotated.config.hidden_size, seed)  # (hidden, hidden)
    head = rotated.get_output_embeddings()
    if head.weight is inner.embed_tokens.weight:  # the head gets the final norm folded in: untie it
        head.weight = nn.Parameter(head.weight.detach().clone())
        rotated.config.tie_word_embeddings = False
    with torch.no_grad():
        for block in inner.layers:
            for norm_name, readers in _READERS.items():
                _fold_norm(block.get_submodule(norm_name), [block.get_submodule(r) for r in readers])
            for reader in (r for readers in _READERS.values() for r in readers):
                _mul_right(block.get_submodule(reader), Q)
            for writer in _WRITERS:
                _mul_left(block.get_submodule(writer), Q)
        _fold_norm(inner.norm, [head])
        _mul_right(head, Q)
        emb = inner.embed_tokens.weight
        emb.copy_((emb.double() @ Q).to(emb.dtype))
    return rotated


def _fold_norm(norm: nn.Module, readers: list[nn.Module]) -> None:
    """RMSNorm's weight into the columns of the linears it feeds; the norm then scales by 1."""
    gamma = norm.weight.detach().double()
    for linear in readers:
        linear.weight.copy_((linear.weight.double() * gamma).to(linear.weight.dtype))
    norm.weight.fill_(1.0)


def _mul_right(linear: nn.Module, Q: torch.Tensor) -> None:
    """A linear that reads the rotated stream: W (out, in) -> W Q."""
    linear.weight.copy_((linear.weight.double() @ Q).to(linear.weight.dtype))


def _mul_left(linear: nn.Module, Q: torch.Tensor) -> None:
    """A linear that writes to the rotated stream: W (out, in) -> Qᵀ W, bias b -> b Q."""
    linear.weight.copy_((Q.T @ linear.weight.double()).to(linear.weight.dtype))
    if getattr(linear, "bias", None) is not None:
        linear.bias.copy_((linear.bias.double() @ Q).to(linear.bias.dtype))
