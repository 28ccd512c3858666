"""What a model weighs once quantized: packed weights, scales, zero-points and the layers kept as they are.

The quantized layers are the linears inside the transformer blocks (``find_linears``) of a model, or,
for a bare weights file, its 2-D float matrices whose names are not embeddings, norms or lm_head.
Everything else (embeddings, norms, lm_head, biases) is kept at its stored dtype, and tied weights
count once, as ``save_pretrained`` writes them.

Worked example: a 4096x4096 layer in INT4 g128 with fp16 scales (symmetric) packs 8 MiB of codes
plus 4096 * 32 scales * 2 bytes = 256 KiB, i.e. 4 + 16/128 = 4.125 bits per weight.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace

import torch
from torch import nn

from quantlab.models.architectures import ARCHITECTURES, ArchSpec, conv1d_stored, find_linears, spec_for
from quantlab.errors import FormatError, ModelLoadError
from quantlab.numerics.formats import QuantFormat, StorageBreakdown, valid_group_sizes
from quantlab.models.weightfiles import TensorListing, describe_skipped, skip_reason

# Name fragments of layers kept in full precision when no architecture says otherwise: the table's default.
DEFAULT_KEEP_FULL_PRECISION: tuple[str, ...] = next(
    f.default for f in fields(ArchSpec) if f.name == "keep_full_precision"
)
# Reference models (name, parameters, hidden size): Llama-shaped, for "what would this cost at scale".
REFERENCE_MODELS = (("1B", 1.24e9, 2048), ("7B", 6.74e9, 4096), ("70B", 70.6e9, 8192))


@dataclass(frozen=True)
class LayerSize:
    """One tensor (a quantized linear's weight, or a kept tensor) and what it costs."""

    name: str
    role: str  # q/k/v/o/gate/up/down/... for quantized layers; embedding/norm/lm_head/bias/other if kept
    shape: tuple[int, ...]
    params: int
    fp_bytes: int  # bytes at its stored dtype
    quant_bytes: int  # bytes in the format (packed codes + scales + zero-points), or fp_bytes if kept
    quantized: bool
    weight_bytes: int = 0  # packed codes (quantized layers only)
    scale_bytes: int = 0
    zero_point_bytes: int = 0

    def to_dict(self) -> dict:
        return {**asdict(self), "shape": list(self.shape)}


@dataclass(frozen=True)
class ModelSize:
    """Bytes of a whole model in one format."""

    fmt_name: str
    quantized_params: int
    full_precision_params: int
    quantized_bytes: int  # packed weights + scales + zero-points of the quantized layers
    full_precision_bytes: int  # kept layers at their stored dtype
    total_bytes: int
    bits_per_weight: float  # over the quantized layers, overhead included
    layers: tuple[LayerSize, ...]
    original_bytes: int  # the same model with every tensor at its stored dtype
    weight_bytes: int
    scale_bytes: int
    zero_point_bytes: int

    @property
    def compression(self) -> float:
        return self.original_bytes / self.total_bytes if self.total_bytes else 0.0

    def to_dict(self, with_layers: bool = True) -> dict:
        """The ``quantlab size --json`` document."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "layers"}
        out["format"] = out.pop("fmt_name")
        out["compression"] = self.compression
        if with_layers:
            out["layers"] = [layer.to_dict() for layer in self.layers]
        return out


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(p in name for p in patterns)


def _keeps(patterns: tuple[str, ...], name: str, role: str) -> bool:
    """A pattern keeps a layer when it is part of its name or is its role (``down`` keeps OPT's fc2)."""
    return role in patterns or _matches(name, patterns)


def kept_role(name: str) -> str:
    """What a tensor kept in full precision is, from its name."""
    if "lm_head" in name:
        return "lm_head"
    if _matches(name, ("embed", "wte", "wpe")):
        return "embedding"
    if _matches(name, ("norm", "ln_", "LayerNorm")):
        return "norm"
    return "bias" if name.endswith(".bias") else "other"


def matrix_role(name: str) -> str:
    """A matrix's role from the architecture tables (``...self_attn.q_proj.weight`` -> ``q``)."""
    base = name.removesuffix(".weight")
    for spec in ARCHITECTURES.values():
        for local, role in spec.roles.items():
            if base.endswith("." + local):
                return role
    return base.rsplit(".", 1)[-1]


def _storage(fmt: QuantFormat, name: str, out_features: int, in_features: int,
             all_in_features: set[int]) -> StorageBreakdown:
    try:
        return fmt.storage(out_features, in_features)
    except FormatError:
        common = sorted(set.intersection(*(set(valid_group_sizes(n)) for n in all_in_features)))
        raise FormatError(
            f"group size {fmt.granularity.group_size} does not divide {name} (input dimension {in_features}); "
            f"sizes that fit every layer: {common or 'none'}; or use per-channel (0)"
        ) from None


def _quantized_layer(fmt, name, role, out_features, in_features, fp_bytes, all_in) -> LayerSize:
    storage = _storage(fmt, name, out_features, in_features, all_in)
    return LayerSize(name, role, (out_features, in_features), storage.numel, fp_bytes, storage.total_bytes, True,
                     storage.weight_bytes, storage.scale_bytes, storage.zero_point_bytes)


def _kept_layer(name: str, shape: tuple[int, ...], nbytes: int) -> LayerSize:
    return LayerSize(name, kept_role(name), shape, math.prod(shape), nbytes, nbytes, False)


def summarize(fmt: QuantFormat, layers: list[LayerSize]) -> ModelSize:
    """Totals over ``layers``; an error when none of them is quantized."""
    quantized = [layer for layer in layers if layer.quantized]
    if not quantized:
        raise ModelLoadError("no linear layers to quantize (every matrix is kept in full precision)")
    kept = [layer for layer in layers if not layer.quantized]
    q_params, q_bytes = sum(layer.params for layer in quantized), sum(layer.quant_bytes for layer in quantized)
    fp_bytes = sum(layer.fp_bytes for layer in kept)
    return ModelSize(
        fmt_name=fmt.name, quantized_params=q_params, full_precision_params=sum(layer.params for layer in kept),
        quantized_bytes=q_bytes, full_precision_bytes=fp_bytes, total_bytes=q_bytes + fp_bytes,
        bits_per_weight=8 * q_bytes / q_params, layers=tuple(layers),
        original_bytes=sum(layer.fp_bytes for layer in layers),
        weight_bytes=sum(layer.weight_bytes for layer in quantized),
        scale_bytes=sum(layer.scale_bytes for layer in quantized),
        zero_point_bytes=sum(layer.zero_point_bytes for layer in quantized),
    )


def model_size(model_or_listing, fmt: QuantFormat, keep_full_precision: tuple[str, ...] | None = None,
               layer_formats: Mapping[str, QuantFormat] | None = None) -> ModelSize:
    """The size of a model (an ``nn.Module``, a ``LoadedModel`` or a ``TensorListing``) in ``fmt``.

    ``keep_full_precision``: name fragments or roles (``down``, ``qkv``) of layers not to quantize; by
    default the architecture table's (embeddings, norms, lm_head). Linears outside the blocks (lm_head) are always kept.
    ``layer_formats`` (modules only): linear name -> the format that replaces ``fmt`` for it (a mixed plan);
    the result is then named ``mixed``.
    """
    model = model_or_listing
    if not isinstance(model, (nn.Module, TensorListing)):
        model = getattr(model, "model", model)  # a LoadedModel (models.py sits above this module)
    if isinstance(model, TensorListing):
        keep = DEFAULT_KEEP_FULL_PRECISION if keep_full_precision is None else tuple(keep_full_precision)
        return summarize(fmt, _listing_layers(model, fmt, keep))
    if isinstance(model, nn.Module):
        keep = spec_for(model).keep_full_precision if keep_full_precision is None else tuple(keep_full_precision)
        size = summarize(fmt, _module_layers(model, fmt, keep, layer_formats or {}))
        return replace(size, fmt_name="mixed") if layer_formats else size
    if layer_formats:
        raise ModelLoadError("per-layer formats size a loaded model, not a weights listing")
    raise ModelLoadError(f"cannot size a {type(model_or_listing).__name__}; give a model or a tensor listing")


def _module_layers(model: nn.Module, fmt: QuantFormat, keep: tuple[str, ...],
                   layer_formats: Mapping[str, QuantFormat]) -> list[LayerSize]:
    linears = [info for info in find_linears(model) if not _keeps(keep, info.name, info.role)]
    all_in = {info.in_features for info in linears}
    quantized = {f"{info.name}.weight": info for info in linears}
    layers = []
    seen = set()  # tied tensors are one object: count it once
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        nbytes = tensor.numel() * tensor.element_size()
        info = quantized.get(name)
        if info is None:
            layers.append(_kept_layer(name, tuple(tensor.shape), nbytes))
        else:
            layers.append(_quantized_layer(layer_formats.get(info.name, fmt), info.name, info.role,
                                           info.out_features, info.in_features, nbytes, all_in))
    return layers


def _listing_layers(listing: TensorListing, fmt: QuantFormat, keep: tuple[str, ...]) -> list[LayerSize]:
    """Matrices are (out, in) as stored, groups along the last dimension; GPT-2's Conv1D files are (in, out)."""
    def reason(t) -> str | None:
        kept = "kept in full precision" if _keeps(keep, t.name, matrix_role(t.name)) else None
        return skip_reason(t.shape, t.dtype) or kept

    reasons = [reason(t) for t in listing.tensors]
    if None not in reasons:  # say why each tensor was left out: the user may expect a matrix in there
        skipped = [(t.name, why) for t, why in zip(listing.tensors, reasons)]
        raise ModelLoadError(f"no linear layers to quantize: {describe_skipped(skipped) or 'the file is empty'}")
    transposed = conv1d_stored({t.name: t.shape for t in listing.tensors})

    def out_in(t) -> tuple[int, int]:  # groups run along the input, whichever way the file stores it
        return (t.shape[1], t.shape[0]) if t.name in transposed else (t.shape[0], t.shape[1])

    all_in = {out_in(t)[1] for t, why in zip(listing.tensors, reasons) if why is None}
    return [
        _quantized_layer(fmt, t.name, matrix_role(t.name), *out_in(t), t.bytes, all_in)
        if why is None else _kept_layer(t.name, t.shape, t.bytes)
        for t, why in zip(listing.tensors, reasons)
    ]


def reference_size(n_params: float, fmt: QuantFormat, hidden: int = 4096, vocab: int = 32000,
                   fp_dtype: torch.dtype = torch.float16) -> ModelSize:
    """The size of a Llama-shaped model of about ``n_params`` parameters (shapes approximate).

    Blocks of q/k/v/o (hidden x hidden) and gate/up/down (MLP width 8/3 hidden, rounded to 256);
    untied embeddings and lm_head and the norms stay in ``fp_dtype`` (16-bit, as such models ship).
    """
    mlp = 256 * round(8 * hidden / 3 / 256)
    per_block = 4 * hidden * hidden + 3 * hidden * mlp
    n_layers = max(1, round((n_params - 2 * vocab * hidden) / per_block))
    width = torch.tensor([], dtype=fp_dtype).element_size()
    shapes = {"q": (hidden, hidden), "k": (hidden, hidden), "v": (hidden, hidden), "o": (hidden, hidden),
              "gate": (mlp, hidden), "up": (mlp, hidden), "down": (hidden, mlp)}
    layers = []
    for role, (out_features, in_features) in shapes.items():
        one = _quantized_layer(fmt, f"{role} (x{n_layers})", role, out_features, in_features,
                               out_features * in_features * width, {hidden, mlp})
        layers.append(LayerSize(one.name, role, one.shape, one.params * n_layers, one.fp_bytes * n_layers,
                                one.quant_bytes * n_layers, True, one.weight_bytes * n_layers,
                                one.scale_bytes * n_layers, one.zero_point_bytes * n_layers))
    for name, shape in (("embed_tokens", (vocab, hidden)), ("lm_head", (vocab, hidden)),
                        (f"norm (x{2 * n_layers + 1})", ((2 * n_layers + 1) * hidden,))):
        layers.append(_kept_layer(name, shape, math.prod(shape) * width))
    return summarize(fmt, layers)
