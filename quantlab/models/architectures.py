"""Where the linear layers of a model are and what they do: one data table per architecture.

Quantization works on the linear layers inside the transformer blocks. Which module list holds
the blocks, what each linear is called, and which op feeds which linears (so that AWQ and
SmoothQuant can fold per-channel scales into it) differ between architectures; those differences
live in ``ARCHITECTURES`` below, keyed by ``config.model_type``, not in ``isinstance`` chains.
Unknown architectures fall back to a generic search: the first ``nn.ModuleList`` whose entries
contain linear layers, with the role taken from the layer's own name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class ScalePair:
    """An op whose output feeds ``linears`` directly, so per-input-channel scales fold into it.

    ``prev`` is a norm (its weight and bias are divided by the scales) or a linear (its output rows
    are divided); names are relative to the block.
    """

    prev: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class ArchSpec:
    blocks: tuple[str, ...]  # candidate paths of the block list, first that exists wins
    roles: dict[str, str]  # linear name inside a block -> role
    scale_pairs: tuple[ScalePair, ...] = ()  # foldable (prev op -> linears) pairs, in block order
    keep_full_precision: tuple[str, ...] = ("embed", "wte", "wpe", "lm_head", "norm", "ln_", "LayerNorm")
    kind: str = "causal"  # "causal" or "encoder"
    attention: str = ""  # the attention module's name inside a block (for KV-cache simulation)


_LLAMA = ArchSpec(
    blocks=("model.layers",),
    roles={
        "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
        "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down",
    },
    scale_pairs=(
        ScalePair("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ScalePair("self_attn.v_proj", ("self_attn.o_proj",)),  # only when k/v heads == heads
        ScalePair("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ScalePair("mlp.up_proj", ("mlp.down_proj",)),
    ),
    attention="self_attn",
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gpt2": ArchSpec(
        blocks=("transformer.h", "h"),
        roles={"attn.c_attn": "qkv", "attn.c_proj": "o", "mlp.c_fc": "up", "mlp.c_proj": "down"},
        scale_pairs=(ScalePair("ln_1", ("attn.c_attn",)), ScalePair("ln_2", ("mlp.c_fc",))),
        attention="attn",
    ),
    "opt": ArchSpec(
        blocks=("model.decoder.layers", "decoder.layers"),
        roles={
            "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.out_proj": "o",
            "fc1": "up", "fc2": "down",
        },
        scale_pairs=(
            ScalePair("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ScalePair("self_attn.v_proj", ("self_attn.out_proj",)),
            ScalePair("final_layer_norm", ("fc1",)),
        ),
        attention="self_attn",
    ),
    "gpt_neox": ArchSpec(
        blocks=("gpt_neox.layers", "layers"),
        roles={
            "attention.query_key_value": "qkv", "attention.dense": "o",
            "mlp.dense_h_to_4h": "up", "mlp.dense_4h_to_h": "down",
        },
        scale_pairs=(
            ScalePair("input_layernorm", ("attention.query_key_value",)),
            ScalePair("post_attention_layernorm", ("mlp.dense_h_to_4h",)),
        ),
        attention="attention",
    ),
    "bert": ArchSpec(
        blocks=("encoder.layer", "bert.encoder.layer"),
        roles={
            "attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
            "attention.output.dense": "o", "intermediate.dense": "up", "output.dense": "down",
        },
        # BERT is post-norm: every LayerNorm output is also the residual of the next sum (q/k/v's
        # norm sits in the previous block, attention.output.LayerNorm feeds intermediate.dense AND
        # output.LayerNorm's residual), so dividing a norm by s would change the residual stream.
        # Nothing folds; AWQ/SmoothQuant scale these linears' inputs explicitly (input_scale).
        scale_pairs=(),
        kind="encoder",
        attention="attention.self",
    ),
}


@dataclass(frozen=True)
class LinearInfo:
    """One quantizable linear layer."""

    name: str  # full module path, e.g. "model.layers.0.self_attn.q_proj"
    block: int | None  # index of its transformer block, None outside the blocks
    local_name: str  # path inside the block, e.g. "self_attn.q_proj"
    role: str  # q, k, v, qkv, o, gate, up, down, or the last name component when unknown
    in_features: int
    out_features: int
    is_conv1d: bool = False  # GPT-2's Conv1D stores its weight transposed (in, out)

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class BlockLayout:
    """The blocks of a model and the spec that describes them."""

    path: str
    blocks: nn.ModuleList
    spec: ArchSpec
    linears: list[LinearInfo] = field(default_factory=list)


def spec_for(model: nn.Module) -> ArchSpec:
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    return ARCHITECTURES.get(model_type) or ArchSpec(blocks=(), roles={})


def _get(root: nn.Module, path: str) -> nn.Module | None:
    module = root
    for part in path.split("."):
        if not hasattr(module, part):
            return None
        module = getattr(module, part)
    return module


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The transformer block list: from the table, else the largest ModuleList holding linears."""
    for path in spec_for(model).blocks:
        module = _get(model, path)
        if isinstance(module, nn.ModuleList):
            return path, module
    candidates = [
        (name, mod) for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and any(is_linear(m) for m in mod[0].modules())
    ]
    return max(candidates, key=lambda c: len(c[1])) if candidates else None


# GPT-2's linears are transformers' Conv1D, which stores its weight as (in, out).
_CONV1D_LINEARS = tuple(ARCHITECTURES["gpt2"].roles)
_EXPANDING_LINEARS = ("attn.c_attn", "mlp.c_fc")  # more outputs than inputs (3x qkv, 4x MLP)


def conv1d_stored(shapes: Mapping[str, Sequence[int]]) -> frozenset[str]:
    """Which matrices of a weights file without its model are stored transposed, as GPT-2's Conv1D.

    No config says so. GPT-2's expanding layers give it away: stored with more columns than rows,
    their (in, out) layout shows; GPTBigCode reuses the names with nn.Linear, stored (out, in), and
    so is left as stored.
    """
    def local(name: str) -> str | None:
        base = name.removesuffix(".weight")
        return next((linear for linear in _CONV1D_LINEARS if base.endswith("." + linear)), None)

    matrices = {name: tuple(shape) for name, shape in shapes.items() if len(shape) == 2 and local(name)}
    probes = [shape for name, shape in matrices.items() if local(name) in _EXPANDING_LINEARS]
    if not probes or not all(cols > rows for rows, cols in probes):
        return frozenset()
    return frozenset(matrices)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), whatever the layer stores. A view, never a copy."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def find_linears(model: nn.Module) -> list[LinearInfo]:
    """Every linear layer inside the transformer blocks, in block order, with its role."""
    found = find_blocks(model)
    if found is None:
        return []
    path, blocks = found
    roles = spec_for(model).roles
    infos = []
    for index, block in enumerate(blocks):
        for local, module in block.named_modules():
            if not is_linear(module):
                continue
            W = weight_matrix(module)  # (out, in)
            infos.append(LinearInfo(
                name=f"{path}.{index}.{local}", block=index, local_name=local,
                role=roles.get(local, local.rsplit(".", 1)[-1]),
                in_features=W.shape[1], out_features=W.shape[0], is_conv1d=isinstance(module, Conv1D),
            ))
    return infos


def layout(model: nn.Module) -> BlockLayout | None:
    found = find_blocks(model)
    if found is None:
        return None
    return BlockLayout(found[0], found[1], spec_for(model), find_linears(model))


@dataclass(frozen=True)
class ModelStructure:
    """A model's quantizable structure, resolved once when the model is opened and then passed down.

    Calibration, sizing and the pipeline read the blocks, their linears (roles and shapes) and the
    norms that feed them from here instead of each walking the modules again. It describes the
    full-precision model it was built from; a quantized copy has QuantizedLinear modules instead.
    """

    model_type: str  # config.model_type, "" when the model has no config
    spec: ArchSpec  # the architecture's table entry (generic when the type is unknown)
    block_path: str | None  # e.g. "model.layers"; None when no block list was found
    n_blocks: int
    linears: tuple[LinearInfo, ...]  # in block order

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """``model``'s block list (``model`` must be the one described, or a copy of it)."""
        if self.block_path is None:
            raise ValueError("this model has no transformer block list")
        return model.get_submodule(self.block_path)

    def block_linears(self, index: int) -> dict[str, LinearInfo]:
        """The linears of block ``index``, by their path inside the block."""
        return {info.local_name: info for info in self.linears if info.block == index}

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(sorted({info.role for info in self.linears}))


def describe(model: nn.Module) -> ModelStructure:
    """Walk ``model`` once and return its :class:`ModelStructure`."""
    found = find_blocks(model)
    path, blocks = found if found is not None else (None, ())
    return ModelStructure(
        model_type=getattr(getattr(model, "config", None), "model_type", "") or "",
        spec=spec_for(model), block_path=path, n_blocks=len(blocks), linears=tuple(find_linears(model)),
    )
