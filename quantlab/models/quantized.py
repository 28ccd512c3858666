"""Quantized linear layers and models built from quantized blocks, without copying the original.

``QuantizedLinear`` holds what a quantized checkpoint holds: integer (or FP8/NF4) codes in one
byte each, scales and zero-points, so a quantized block takes about a quarter of its fp32 size.
Its forward dequantizes the weight and calls ``F.linear``: the arithmetic is simulated, the
storage is real, and the output is exactly what a kernel that dequantizes on the fly computes.

``build_quantized_model`` makes the model that carries those blocks: a new object that shares
every module outside the blocks (embeddings, final norm, lm_head) with the original and copies
only the modules on the path from the root to the block list, shallowly. The original, which the
app caches and every session shares, is never modified.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from quantlab.models.architectures import find_blocks, weight_matrix
from quantlab.errors import FormatError
from quantlab.numerics.primitives import QParams, Quantized, dequantize


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is stored quantized: y = act_q(x / input_scale) Ŵᵀ + b.

    ``input_scale`` is a per-input-channel divisor (SmoothQuant/AWQ scales that could not be folded
    into the previous op; the weight it pairs with is already multiplied by it). ``act_quantizer``
    fake-quantizes the input (W8A8). ``in_perm`` is set when GPTQ's act-order stored the codes with
    permuted input columns: column ``j`` of the codes is input feature ``in_perm[j]``.
    ``input_transform`` (a module, e.g. the online Hadamard rotation QuaRot puts before down_proj)
    maps the input first; everything else (scales, quantizer, codes) is about the transformed input.
    """

    def __init__(self, quantized: Quantized, bias: torch.Tensor | None = None, *,
                 input_scale: torch.Tensor | None = None, in_perm: torch.Tensor | None = None,
                 act_quantizer: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 input_transform: nn.Module | None = None) -> None:
        super().__init__()
        if quantized.codes.dim() != 2:
            raise FormatError(f"a linear weight is 2-D (out, in), got codes of shape {tuple(quantized.codes.shape)}")
        self.out_features, self.in_features = quantized.codes.shape
        self.fmt = quantized.fmt
        self.weight_dtype = quantized.dtype
        self.register_buffer("codes", quantized.codes)  # (out, in) int8/uint8/float8
        self.register_buffer("scale", quantized.qparams.scale)  # (out or 1, groups, 1)
        self.register_buffer("zero_point", quantized.qparams.zero_point)  # same shape, int32, or None
        self.register_buffer("clip_ratio", quantized.qparams.clip_ratio)
        self.register_buffer("global_scale", quantized.qparams.global_scale)  # NVFP4's per-tensor fp32, or None
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("input_scale", None if input_scale is None else input_scale.detach().clone())
        self.register_buffer("in_perm", in_perm)
        self.act_quantizer = act_quantizer
        self.input_transform = input_transform

    @property
    def quantized(self) -> Quantized:
        """The stored weight as a primitives.Quantized (codes in stored column order)."""
        return Quantized(self.codes, QParams(self.scale, self.zero_point, self.clip_ratio, self.global_scale), self.fmt, self.weight_dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """Ŵ as (out, in) in the original input order and dtype."""
        W = dequantize(self.quantized)  # (out, in), stored column order
        if self.in_perm is not None:
            W = W[:, torch.argsort(self.in_perm)]
        return W

    def storage_bytes(self) -> int:
        """Packed size of the weight (codes at n_bits, scales, zero-points) plus the fp bias/scales."""
        packed = self.fmt.storage(self.out_features, self.in_features).total_bytes
        extras = [t for t in (self.bias, self.input_scale) if t is not None]
        return packed + sum(t.numel() * t.element_size() for t in extras)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:
            x = self.input_transform(x)
        if self.input_scale is not None:
            x = x / self.input_scale.to(x.dtype)
        if self.act_quantizer is not None:
            x = self.act_quantizer(x)
        W = self.dequantized_weight().to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, W, bias)

    def extra_repr(self) -> str:
        act = f", act={self.act_quantizer}" if self.act_quantizer is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt.name}{act}"

    @classmethod
    def from_linear(cls, module: nn.Module, quantized: Quantized, **kwargs) -> QuantizedLinear:
        """Replace ``module`` (nn.Linear or GPT-2 Conv1D): keeps its bias and input transform, checks the shape."""
        expected = tuple(weight_matrix(module).shape)
        if tuple(quantized.codes.shape) != expected:
            raise FormatError(f"quantized weight {tuple(quantized.codes.shape)} does not match the layer's (out, in) {expected}")
        return cls(quantized, getattr(module, "bias", None), input_transform=input_transform_of(module), **kwargs)


def input_transform_of(module: nn.Module) -> nn.Module | None:
    """The transform ``module`` applies to its input before its weight (see ``attach_input_transform``), or None."""
    return getattr(module, "input_transform", None)


def attach_input_transform(linear: nn.Module, transform: nn.Module) -> None:
    """Make the full-precision ``linear`` compute W(transform(x)), in place (``linear`` must be a private copy).

    A forward pre-hook, registered now, so it runs before any hook registered later: calibration's
    input recorders then see the transformed input, the one the fused weight multiplies, and
    ``QuantizedLinear.from_linear`` carries the transform over.
    """
    if input_transform_of(linear) is not None:
        raise FormatError("this linear already transforms its input; rotate the original model, not a rotated copy")
    linear.input_transform = transform
    linear.register_forward_pre_hook(_transform_input)


def _transform_input(module: nn.Module, args: tuple) -> tuple:
    return (module.input_transform(args[0]), *args[1:])


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the module at dotted ``path`` inside ``root`` (root must be a private copy)."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def _shallow_module_copy(module: nn.Module) -> nn.Module:
    """A new module object whose child/parameter/buffer dicts are new but whose entries are shared."""
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    return clone


def build_quantized_model(model: nn.Module, blocks_replacement: Sequence[nn.Module]) -> nn.Module:
    """A new model whose transformer blocks are ``blocks_replacement``; everything else is shared.

    Only the modules on the path from the root to the block list are copied (shallowly), so the
    cost is a handful of Python objects. Shared modules (embeddings, final norm, lm_head) must be
    treated as read-only by whoever uses the result.
    """
    found = find_blocks(model)
    if found is None:
        raise FormatError(f"no transformer blocks found in {type(model).__name__}; cannot quantize it block by block")
    path, blocks = found
    if len(blocks_replacement) != len(blocks):
        raise FormatError(f"the model has {len(blocks)} blocks, got {len(blocks_replacement)} replacements")
    root = _shallow_module_copy(model)
    parent = root
    parts = path.split(".")
    for part in parts[:-1]:
        child = _shallow_module_copy(parent._modules[part])
        parent._modules[part] = child
        parent = child
    parent._modules[parts[-1]] = nn.ModuleList(blocks_replacement)
    return root
