"""Pre-quantized checkpoints: read the stored codes and scales back into weights, one tensor at a time.

A checkpoint whose config.json holds a ``quantization_config`` does not store ``weight`` for its
quantized linears but codes plus scales (and zero-points). QuantLab opens such a model as the
full-precision architecture with each quantized weight replaced by its dequantization
``W = (q - z) * s``, computed in fp32 from the stored tensors and then cast to the model's dtype.
Evaluating that model scores the checkpoint as stored (a kernel that dequantizes on the fly does
the same arithmetic); quantizing it again starts from those dequantized weights.

Layouts read here (every tensor is read on its own from the safetensors memory map):

- compressed-tensors ``pack-quantized``: ``weight_packed`` int32 (out, in*b/32), codes signed in
  [-2^(b-1), 2^(b-1)-1]; ``weight_scale`` (out, groups) / (out, 1) / (1,); optional
  ``weight_zero_point`` (signed, packed along the output dim unless per-tensor) and
  ``weight_g_idx`` (act-order group of each input column). Unpacking is compressed-tensors' own.
- compressed-tensors ``int-quantized`` / ``float-quantized`` / ``naive-quantized``: ``weight``
  holds the codes unpacked (int8 or float8) with the same scale/zero-point tensors; ``block``
  strategy scales cover (rows, cols) tiles.
- GPTQ (AutoGPTQ / GPTQModel, ``checkpoint_format`` gptq or gptq_v2): ``qweight`` int32
  (in*b/32, out) packed along the input dim, ``qzeros`` int32 (groups, out*b/32), ``scales``
  (groups, out), ``g_idx`` (in,); format gptq (v1) stores each zero-point minus one.
- AWQ GEMM: ``qweight`` int32 (in, out*b/32) and ``qzeros`` (groups, out*b/32) with AutoAWQ's
  interleaved nibble order, ``scales`` (groups, out), unsigned codes, no g_idx.
Anything else is refused with one line that names the format.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from quantlab.errors import ModelLoadError

log = logging.getLogger(__name__)

CT_FORMATS = ("pack-quantized", "int-quantized", "float-quantized", "naive-quantized")
AWQ_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # AutoAWQ packs columns 0,2,4,6,1,3,5,7 into nibbles 0..7; this undoes it
PACKED_BITS = (2, 4, 8)  # GPTQ/AWQ widths whose codes fill an int32 exactly


@dataclass(frozen=True)
class WeightArgs:
    """How one group of layers is quantized, as the checkpoint's config says."""

    num_bits: int
    kind: str  # "int" | "float"
    symmetric: bool
    strategy: str  # "tensor" | "channel" | "group" | "block"
    group_size: int | None
    block_structure: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("int", "float"):
            raise ModelLoadError(f"quantized weights of type {self.kind!r} cannot be read; int and float are")
        if self.strategy == "group" and not self.group_size:
            raise ModelLoadError("a group-quantized scheme without a group_size cannot be read")

    @property
    def label(self) -> str:
        grid = f"int{self.num_bits}" if self.kind == "int" else f"fp{self.num_bits}"
        gran = {"group": f"g{self.group_size}", "block": f"block{list(self.block_structure or ())}"}
        return f"{grid}-{gran.get(self.strategy, self.strategy)}{'' if self.symmetric else '-asym'}"


@dataclass(frozen=True)
class StoredQuantization:
    """What a pre-quantized checkpoint holds: its method, layout and the layers stored quantized."""

    method: str  # "compressed-tensors" | "gptq" | "awq"
    layout: str  # "pack-quantized", "int-quantized", ..., "gptq", "gptq_v2", "gemm"
    schemes: tuple[str, ...]  # labels of the weight schemes, e.g. ("int4-g128",)
    layers: tuple[str, ...]  # module names whose weights were read from codes
    qconfig: dict = field(default_factory=dict, compare=False, repr=False)  # to read a layer's codes again

    @property
    def description(self) -> str:
        return f"{self.method} {self.layout} {', '.join(self.schemes)} ({len(self.layers)} layers)"

    def to_dict(self) -> dict:
        return {"method": self.method, "layout": self.layout, "schemes": list(self.schemes),
                "layers": len(self.layers)}


@dataclass(frozen=True)
class StoredLayer:
    """One stored-quantized linear as the checkpoint holds it: codes on its grid, the scales beside them.

    ``codes`` are the stored integers (or float8 values), unpacked to (out, in); ``scale`` and
    ``zero`` give each element its own (broadcast) scale and zero-point, so ``weight()`` is the
    dequantization ``(q - z) * s`` that evaluation uses. ``scales`` keeps the stored tensor, one
    value per channel / group / block, for the views that show them.
    """

    name: str
    scheme: str  # e.g. "int4-g128" or "int4-g128-asym"
    codes: torch.Tensor  # (out, in) float32 holding the stored codes
    scale: torch.Tensor  # (out, in) or broadcastable, fp32
    zero: torch.Tensor | None  # like ``scale``; None for symmetric schemes
    scales: torch.Tensor  # as stored, fp32

    def weight(self) -> torch.Tensor:
        """The fp32 (out, in) dequantized weight."""
        W = self.codes - self.zero if self.zero is not None else self.codes.clone()
        return W.mul_(self.scale)


def quantization_config(config) -> dict | None:
    """The checkpoint's ``quantization_config`` as a plain dict, or None for a full-precision model."""
    qconfig = getattr(config, "quantization_config", None)
    if qconfig is None:
        return None
    if not isinstance(qconfig, dict):
        qconfig = qconfig.to_dict() if hasattr(qconfig, "to_dict") else vars(qconfig)
    return dict(qconfig)


class _Tensors:
    """Lazy access to a folder's tensors: one memory-mapped file handle per shard, one tensor per read."""

    def __init__(self, files: list[Path]) -> None:
        from safetensors import safe_open

        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._where = {name: h for h in self._handles for name in h.keys()}

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)

    def optional(self, name: str) -> torch.Tensor | None:
        return self.get(name) if name in self._where else None


def _safetensors_files(folder: Path) -> list[Path]:
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        weight_map = json.loads(index[0].read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: pre-quantized checkpoints are read from safetensors, and it has none")
    return files


def _ct_args(scheme: dict) -> WeightArgs:
    weights = scheme.get("weights") or {}
    block = weights.get("block_structure")
    return WeightArgs(
        num_bits=int(weights.get("num_bits", 8)), kind=weights.get("type", "int"),
        symmetric=bool(weights.get("symmetric", True)), strategy=weights.get("strategy", "tensor"),
        group_size=weights.get("group_size"), block_structure=tuple(block) if block else None,
    )


def _target_matches(target: str, name: str) -> bool:
    if target == "Linear":  # compressed-tensors' class target; only linears hold weight_scale
        return True
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return name == target or name.endswith("." + target)


def _check_ct(qconfig: dict) -> dict[str, tuple[str, WeightArgs]]:
    """compressed-tensors config groups -> {group: (target pattern list, args)}; refuses unknown layouts."""
    top_format = qconfig.get("format")
    groups = {}
    for key, scheme in (qconfig.get("config_groups") or {}).items():
        layout = scheme.get("format") or top_format
        if layout not in CT_FORMATS:
            raise ModelLoadError(f"compressed-tensors format {layout!r} cannot be read yet; readable: "
                                 f"{', '.join(CT_FORMATS)}")
        if scheme.get("weights") is None:
            raise ModelLoadError(f"compressed-tensors group {key} quantizes activations only; QuantLab reads "
                                 "weight-quantized checkpoints")
        args = _ct_args(scheme)
        if args.strategy not in ("tensor", "channel", "group", "block"):
            raise ModelLoadError(f"compressed-tensors strategy {args.strategy!r} ({layout}) cannot be read yet")
        groups[key] = (layout, tuple(scheme.get("targets") or ()), args)
    if not groups:
        raise ModelLoadError("the checkpoint's compressed-tensors config has no config_groups")
    if qconfig.get("sparsity_config"):
        raise ModelLoadError("sparse compressed-tensors checkpoints (sparsity_config) cannot be read yet")
    return groups


def check_supported(qconfig: dict) -> str:
    """The method name when QuantLab can read this config, else a ModelLoadError naming the format."""
    method = str(qconfig.get("quant_method", "")).lower()
    if method == "compressed-tensors":
        _check_ct(qconfig)
    elif method == "gptq":
        if int(qconfig.get("bits", 0)) not in PACKED_BITS:
            raise ModelLoadError(f"GPTQ checkpoints with {qconfig.get('bits')} bits cannot be read; 2, 4 and 8 can")
    elif method == "awq":
        version = str(qconfig.get("version", "gemm")).lower()
        if version != "gemm" or int(qconfig.get("bits", qconfig.get("w_bit", 4))) != 4:
            raise ModelLoadError(f"AWQ {version} checkpoints cannot be read; AWQ GEMM int4 can")
    else:
        raise ModelLoadError(f"pre-quantized checkpoints of quant_method {method or 'unknown'!r} cannot be read; "
                             "QuantLab reads compressed-tensors, GPTQ and AWQ GEMM checkpoints")
    return method


def _ct_scales(stored: torch.Tensor, shape: tuple[int, int], args: WeightArgs,
               g_idx: torch.Tensor | None) -> torch.Tensor:
    """Per-element fp32 scale (or zero-point) of a (out, in) weight from its stored layout."""
    out_features, in_features = shape
    stored = stored.float()
    if args.strategy == "tensor" or stored.numel() == 1:
        return stored.reshape(1, 1).expand(out_features, in_features)
    if args.strategy == "channel":
        return stored.reshape(out_features, 1).expand(out_features, in_features)
    if args.strategy == "block":
        rows, cols = args.block_structure
        return stored.repeat_interleave(rows, 0)[:out_features].repeat_interleave(cols, 1)[:, :in_features]
    groups = g_idx.long() if g_idx is not None else torch.arange(in_features) // args.group_size
    return stored.reshape(out_features, -1)[:, groups]


def _ct_layer(tensors: _Tensors, name: str, layout: str, args: WeightArgs) -> StoredLayer:
    """One compressed-tensors layer's stored codes, scales and zero-points."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    if layout == "pack-quantized":
        shape = tuple(int(d) for d in tensors.get(f"{name}.weight_shape").tolist())
        codes = unpack_from_int32(tensors.get(f"{name}.weight_packed"), args.num_bits, torch.Size(shape))
    else:
        codes = tensors.get(f"{name}.weight")
        shape = tuple(codes.shape)
    g_idx = tensors.optional(f"{name}.weight_g_idx")
    zero_point, zero = tensors.optional(f"{name}.weight_zero_point"), None
    if zero_point is not None and not args.symmetric:
        if layout == "pack-quantized" and zero_point.dtype == torch.int32 and zero_point.numel() > 1:
            groups = zero_point.shape[1]
            zero_point = unpack_from_int32(zero_point, args.num_bits, torch.Size((shape[0], groups)), packed_dim=0)
        zero = _ct_scales(zero_point, shape, args, g_idx)
    stored_scale = tensors.get(f"{name}.weight_scale")
    return StoredLayer(name, args.label, codes.float(), _ct_scales(stored_scale, shape, args, g_idx), zero,
                       stored_scale.float())


def _unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 (rows, cols) holding 32/bits codes per word along dim 0 -> (rows*32/bits, cols) unsigned."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32).reshape(1, per_word, 1)
    codes = (packed.unsqueeze(1) >> shifts) & (2**bits - 1)  # (rows, per_word, cols)
    return codes.reshape(-1, packed.shape[1])


def _unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 (rows, cols) holding 32/bits codes per word along dim 1 -> (rows, cols*32/bits) unsigned."""
    return _unpack_rows(packed.t(), bits).t()


def _gptq_layer(tensors: _Tensors, name: str, bits: int, group_size: int, v1: bool, scheme: str) -> StoredLayer:
    q = _unpack_rows(tensors.get(f"{name}.qweight"), bits).float()  # (in, out)
    zeros = _unpack_cols(tensors.get(f"{name}.qzeros"), bits).float()[:, : q.shape[1]]  # (groups, out)
    if v1:  # GPTQ v1 stores z - 1 (an AutoGPTQ convention kept for compatibility)
        zeros += 1
    scales = tensors.get(f"{name}.scales").float()  # (groups, out)
    g_idx = tensors.optional(f"{name}.g_idx")
    in_features = q.shape[0]
    step = group_size if group_size > 0 else in_features
    groups = g_idx.long() if g_idx is not None else torch.arange(in_features) // step
    return StoredLayer(name, scheme, q.t().contiguous(), scales[groups].t(), zeros[groups].t(), scales.t())


def _awq_layer(tensors: _Tensors, name: str, group_size: int, scheme: str) -> StoredLayer:
    order = torch.tensor(AWQ_ORDER)

    def unpack(packed: torch.Tensor) -> torch.Tensor:
        codes = _unpack_cols(packed, 4)  # (rows, cols*8), nibble order
        return codes.reshape(codes.shape[0], -1, 8)[:, :, order].reshape(codes.shape[0], -1).float()

    q = unpack(tensors.get(f"{name}.qweight"))  # (in, out)
    zeros = unpack(tensors.get(f"{name}.qzeros"))  # (groups, out)
    scales = tensors.get(f"{name}.scales").float()  # (groups, out)
    groups = torch.arange(q.shape[0]) // group_size
    return StoredLayer(name, scheme, q.t().contiguous(), scales[groups].t(), zeros[groups].t(), scales.t())


def _ct_layers(tensors: _Tensors, qconfig: dict) -> Iterator[tuple[str, str, WeightArgs]]:
    groups = _check_ct(qconfig)
    ignore = tuple(qconfig.get("ignore") or ())
    stems = sorted({n.rsplit(".", 1)[0] for n in tensors.names() if n.endswith(".weight_scale")})
    for stem in stems:
        if any(_target_matches(t, stem) for t in ignore):
            continue
        match = next(((layout, args) for layout, targets, args in groups.values()
                      if any(_target_matches(t, stem) for t in targets)), None)
        if match is None:
            raise ModelLoadError(f"{stem} stores a weight scale but no config group targets it; the checkpoint's "
                                 "quantization_config does not describe its tensors")
        yield stem, *match


def stored_layers(folder: str | Path, qconfig: dict, names: set[str] | None = None) -> Iterator[StoredLayer]:
    """Every stored-quantized linear (or those in ``names``) as stored, one at a time."""
    tensors = _Tensors(_safetensors_files(Path(folder)))
    method = check_supported(qconfig)
    if method == "compressed-tensors":
        for stem, layout, args in _ct_layers(tensors, qconfig):
            if names is None or stem in names:
                yield _ct_layer(tensors, stem, layout, args)
        return
    stems = sorted(n.removesuffix(".qweight") for n in tensors.names() if n.endswith(".qweight"))
    group_size = int(qconfig.get("group_size", qconfig.get("q_group_size", 128)))
    (scheme,) = describe_stored(qconfig, ()).schemes
    for stem in (s for s in stems if names is None or s in names):
        if method == "gptq":
            v1 = str(qconfig.get("checkpoint_format", "gptq")).lower() != "gptq_v2"
            yield _gptq_layer(tensors, stem, int(qconfig["bits"]), group_size, v1, scheme)
        else:
            yield _awq_layer(tensors, stem, group_size, scheme)


def stored_layer(folder: str | Path, qconfig: dict, name: str) -> StoredLayer:
    """One layer's stored codes and scales (for the views that show a checkpoint as stored)."""
    found = next(stored_layers(folder, qconfig, {name}), None)
    if found is None:
        raise ModelLoadError(f"{name} is not stored quantized in this checkpoint")
    return found


def dequantized_weights(folder: str | Path, qconfig: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """``(module name, fp32 (out, in) weight)`` for every stored-quantized linear, one at a time."""
    for layer in stored_layers(folder, qconfig):
        yield layer.name, layer.weight()


def describe_stored(qconfig: dict, layers: tuple[str, ...]) -> StoredQuantization:
    """The summary a loaded model carries: method, layout, scheme labels and layer names."""
    method = check_supported(qconfig)
    if method == "compressed-tensors":
        groups = _check_ct(qconfig).values()
        layout = ", ".join(sorted({layout for layout, _, _ in groups}))
        schemes = tuple(sorted({args.label for _, _, args in groups}))
    elif method == "gptq":
        layout = str(qconfig.get("checkpoint_format", "gptq"))
        schemes = (f"int{qconfig['bits']}-g{qconfig.get('group_size', 128)}"
                   f"{'' if qconfig.get('sym', True) else '-asym'}{'-act-order' if qconfig.get('desc_act') else ''}",)
    else:
        layout = "gemm"
        schemes = (f"int4-g{qconfig.get('group_size', qconfig.get('q_group_size', 128))}-asym",)
    return StoredQuantization(method, layout, schemes, layers, dict(qconfig))


def local_folder(source: str) -> Path:
    """The folder holding a model's files: the path itself, or a hub id's snapshot in the local cache."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, local_files_only=True))


def fill_dequantized(model: nn.Module, source: str, qconfig: dict) -> StoredQuantization:
    """Give every stored-quantized linear of ``model`` its dequantized weight (in the model's dtype).

    ``model`` was built without the quantization config, so those linears hold placeholder weights.
    """
    layers = []
    for name, W in dequantized_weights(local_folder(source), qconfig):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ModelLoadError(f"the checkpoint stores quantized weights for {name}, which the model's "
                                 "architecture does not have") from None
        if tuple(module.weight.shape) != tuple(W.shape):
            raise ModelLoadError(f"{name}: stored codes of shape {tuple(W.shape)} do not match the layer's "
                                 f"{tuple(module.weight.shape)}")
        module.weight = nn.Parameter(W.to(module.weight.dtype), requires_grad=False)
        layers.append(name)
    if not layers:
        raise ModelLoadError(f"{source} declares a quantization_config but stores no quantized weights")
    stored = describe_stored(qconfig, tuple(layers))
    log.warning("%s is pre-quantized (%s): its weights were dequantized from the stored codes; evaluation scores "
                "it as stored, and quantizing it again starts from those dequantized weights", source,
                stored.description)
    return stored
