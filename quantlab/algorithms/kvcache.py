"""KV-cache quantization, simulated inside attention so that its cost shows up in perplexity.

A quantized KV cache stores every key and value vector in INT8, INT4 or FP8 (e4m3) as it is
written, and attention reads them back. We reproduce exactly that in the forward pass: a custom
attention function, registered in transformers' ``AttentionInterface`` as ``"quantlab_kv"``,
fake-quantizes ``key_states`` and ``value_states`` *after* RoPE (what a real cache stores) and
then runs the model's own attention implementation (SDPA, or whatever the model was loaded with).

Scales are chosen per token as it is written, so the simulation is causal, as in a real cache:

- ``per-token``: one scale per token shared by all its key (or value) heads, i.e. one scale per
  cache row of ``heads * head_dim`` values;
- ``per-head``: one scale per token and head (``head_dim`` values), finer and more robust to
  heads of very different magnitude.

Scales are stored as fp16, as cache implementations do.

Isolation: the function reads its spec from an attribute of the attention module, and each
patched module gets its *own copy* of the config with ``_attn_implementation = "quantlab_kv"``.
The model-level config (which also chooses the attention-mask format) is left as it was, and no
other model, in particular the cached full-precision one, sees any change. Use
``kv_quantized_view`` to get a KV-quantized model that shares all weights with one you must not
modify.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from quantlab.recipe import KVSpec
from quantlab.models.architectures import find_blocks, spec_for
from quantlab.errors import FormatError
from quantlab.numerics.formats import Granularity, QuantFormat
from quantlab.numerics.primitives import fake_quantize

log = logging.getLogger(__name__)

ATTENTION_NAME = "quantlab_kv"
_SPEC_ATTR = "quantlab_kv_spec"  # the KVSpec of one patched attention module
_INNER_ATTR = "quantlab_kv_inner"  # the attention implementation it wraps, e.g. "sdpa"


def kv_format(spec: KVSpec) -> QuantFormat:
    """The engine format of one cache row: symmetric, one fp16 scale per row."""
    return QuantFormat.parse(spec.fmt_name, granularity=Granularity("channel"), scale_dtype="fp16")


def fake_quantize_kv(states: torch.Tensor, spec: KVSpec) -> torch.Tensor:
    """Fake-quantize ``(batch, heads, seq, head_dim)`` keys or values as a quantized cache would."""
    batch, heads, seq, head_dim = states.shape
    fmt = kv_format(spec)
    if spec.granularity == "per-head":
        return fake_quantize(states.reshape(-1, head_dim), fmt).reshape(states.shape)
    rows = states.transpose(1, 2).reshape(batch * seq, heads * head_dim)  # one row per token
    quantized = fake_quantize(rows, fmt).reshape(batch, seq, heads, head_dim)
    return quantized.transpose(1, 2)


def quantized_kv_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """The ``"quantlab_kv"`` attention: quantize K and V, then run the wrapped implementation."""
    spec = getattr(module, _SPEC_ATTR, None)
    if spec is not None:
        key, value = fake_quantize_kv(key, spec), fake_quantize_kv(value, spec)
    inner = ALL_ATTENTION_FUNCTIONS.get(getattr(module, _INNER_ATTR, "sdpa"), sdpa_attention_forward)
    return inner(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTENTION_NAME, quantized_kv_attention)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention module of every block, found through the architecture table."""
    found = find_blocks(model)
    name = spec_for(model).attention
    if found is None or not name:
        raise FormatError(
            f"KV-cache quantization does not know where attention lives in {type(model).__name__}; "
            "add an `attention` entry for its model_type to quantlab.models.architectures.ARCHITECTURES"
        )
    return [block.get_submodule(name) for block in found[1]]


def apply_kv_quantization(model: nn.Module, spec: KVSpec) -> int:
    """Make every attention module of ``model`` quantize its keys and values; returns how many.

    Modifies ``model``'s attention modules in place: call it on a model you own (a quantized copy,
    or ``kv_quantized_view``), never on a shared one.
    """
    kv_format(spec)  # an unusable format fails here, not in the middle of a forward pass
    modules = attention_modules(model)
    for module in modules:
        inner = getattr(module, _INNER_ATTR, None) or module.config._attn_implementation or "sdpa"
        if inner == "eager":
            inner = "sdpa"  # same maths; the eager function is model-specific and not registered
        # A deep copy: the config setter also rewrites sub-configs, which a shallow copy shares.
        module.config = copy.deepcopy(module.config)
        module.config._attn_implementation = ATTENTION_NAME
        setattr(module, _SPEC_ATTR, spec)
        setattr(module, _INNER_ATTR, inner)
    log.info("KV cache quantized to %s %s in %d attention modules", spec.fmt_name, spec.granularity, len(modules))
    return len(modules)


def remove_kv_quantization(model: nn.Module) -> None:
    """Undo ``apply_kv_quantization``: back to the wrapped attention implementation."""
    for module in attention_modules(model):
        inner = getattr(module, _INNER_ATTR, None)
        if inner is None:
            continue
        module.config = copy.deepcopy(module.config)
        module.config._attn_implementation = inner
        delattr(module, _SPEC_ATTR)
        delattr(module, _INNER_ATTR)


def kv_quantized_view(model: nn.Module, spec: KVSpec) -> nn.Module:
    """A new model object sharing every weight with ``model``, with its KV cache quantized.

    Only module objects are new (parameters and buffers are the same tensors), so this costs no
    weight memory and leaves ``model`` untouched.
    """
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    view = copy.deepcopy(model, memo)
    apply_kv_quantization(view, spec)
    return view
