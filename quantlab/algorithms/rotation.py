"""Hadamard rotation of the residual stream (fused) and of the down-projection inputs (online): QuaRot.

For an orthogonal Q (hidden x hidden), a pre-norm transformer computes exactly the same function when
the residual stream carries x Q instead of x: RMSNorm is rotation-invariant once its weight is folded
into the linears it feeds (||x Q|| = ||x||), every linear reading the stream becomes W Q, every
linear writing to it becomes Qᵀ W, the embedding E Q and the head W Q. Nothing runs online. A
randomized Hadamard matrix (random signs times a Hadamard matrix, over sqrt(n)) spreads each
channel over all the others, so the few huge residual channels that make INT4 per-channel and W4A8
hard are flattened before quantizing; any weight format then applies to the rotated copy.

The down-projection's input (QuaRot's online Hadamard, SpinQuant's R4) is rotated too unless
``down_proj=False``: act(gate(x)) * up(x) passes through a nonlinearity and a product, so no
weight upstream can absorb a rotation, and it runs online, x -> x R
(:class:`~quantlab.numerics.hadamard.HadamardTransform`, butterflies, no n x n matmul) with
down_proj's weight W -> W R fused, so x R Rᵀ Wᵀ = x Wᵀ. It flattens the FFN's hidden channels
(gate times up: heavy-tailed) before INT4 or W4A8 meets them.
The down-projection's input rotation needs nothing of the residual stream, so it is valid in any
architecture whose table names a ``down`` linear, post-norm BERT included (its input is
gelu(intermediate), inside the FFN, before the residual add and the LayerNorm); the residual
rotation needs pre-norm RMSNorm (Llama-style). The residual matrix is compressed-tensors'
``random_hadamard_matrix``.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from quantlab.errors import FormatError
from quantlab.models.architectures import describe, spec_for, weight_matrix
from quantlab.models.quantized import attach_input_transform
from quantlab.numerics.hadamard import HadamardTransform

# Norm -> the linears it feeds, and the linears that write to the residual stream, per block.
_READERS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
_WRITERS = ("self_attn.o_proj", "mlp.down_proj")
_PRE_NORM_RMS = ("llama", "mistral", "qwen2", "qwen3")


def hadamard_rotation(size: int, seed: int = 0) -> torch.Tensor:
    """An orthogonal randomized Hadamard matrix (size, size) in float64."""
    from compressed_tensors.transform import random_hadamard_matrix

    H = random_hadamard_matrix(size, torch.float64, gen=torch.Generator().manual_seed(seed))
    return H / math.sqrt(size)  # the library's matrix has entries +-1 (times its signs): H Hᵀ = n I


def rotate_model(model: nn.Module, seed: int = 0, down_proj: bool = True, residual: bool = True) -> nn.Module:
    """A rotated deep copy of ``model``: its residual stream (Llama-style only) and, with ``down_proj``,
    the input of each FFN's down-projection (online). The model itself is not modified."""
    if not (residual or down_proj):
        raise FormatError("nothing to rotate: ask for the residual stream, the down-projections' inputs or both")
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    if residual and model_type not in _PRE_NORM_RMS:
        raise FormatError(f"the residual-stream rotation needs a pre-norm RMSNorm model (Llama-style), not "
                          f"{model_type or type(model).__name__}: a post-norm LayerNorm (BERT) normalizes the "
                          "residual sum itself, so x Q does not pass through it; rotate the down-projections' "
                          "inputs alone (rot4-)")
    downs = [name for name, role in spec_for(model).roles.items() if role == "down"] if down_proj else []
    if down_proj and not downs:
        raise FormatError(f"no down-projection is known for {model_type or type(model).__name__} "
                          "(architectures.ARCHITECTURES names none with role 'down')")
    rotated = copy.deepcopy(model)
    with torch.no_grad():
        if residual:
            _rotate_residual(rotated, hadamard_rotation(rotated.config.hidden_size, seed))
        for block in (describe(rotated).blocks(rotated) if downs else ()):
            for name in downs:
                _rotate_input_online(block.get_submodule(name), seed + 1)
    return rotated


def _rotate_residual(rotated: nn.Module, Q: torch.Tensor) -> None:
    """Fold every RMSNorm into its readers, then readers W -> W Q, writers W -> Qᵀ W, embedding E Q."""
    inner = rotated.model
    head = rotated.get_output_embeddings()
    if head.weight is inner.embed_tokens.weight:  # the head gets the final norm folded in: untie it
        head.weight = nn.Parameter(head.weight.detach().clone())
        rotated.config.tie_word_embeddings = False
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


def _rotate_input_online(linear: nn.Module, seed: int) -> None:
    """W -> W R fused, and x -> x R before the weight at run time: the same output, rotated input."""
    transform = HadamardTransform(weight_matrix(linear).shape[1], seed)
    _mul_right(linear, transform.matrix())
    attach_input_transform(linear, transform)


def _fold_norm(norm: nn.Module, readers: list[nn.Module]) -> None:
    """RMSNorm's weight into the columns of the linears it feeds; the norm then scales by 1."""
    gamma = norm.weight.detach().double()
    for linear in readers:
        linear.weight.copy_((linear.weight.double() * gamma).to(linear.weight.dtype))
    norm.weight.fill_(1.0)


def _mul_right(linear: nn.Module, Q: torch.Tensor) -> None:
    """A linear that reads the rotated stream: W (out, in) -> W Q."""
    W = weight_matrix(linear)  # a view (GPT-2's Conv1D stores Wᵀ)
    W.copy_((W.double() @ Q).to(W.dtype))


def _mul_left(linear: nn.Module, Q: torch.Tensor) -> None:
    """A linear that writes to the rotated stream: W (out, in) -> Qᵀ W, bias b -> b Q."""
    linear.weight.copy_((Q.T @ linear.weight.double()).to(linear.weight.dtype))
    if getattr(linear, "bias", None) is not None:
        linear.bias.copy_((linear.bias.double() @ Q).to(linear.bias.dtype))
