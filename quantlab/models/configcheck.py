"""A model's config.json checked before transformers builds anything from it.

transformers trusts its config: ``num_hidden_layers = 10**9`` builds layers until memory runs out,
``architectures: 5`` or ``max_position_embeddings: "big"`` end in a TypeError deep inside it, and a
config nested 100,000 levels deep is a RecursionError. Here each field a builder reads is checked for
its type and a bound, and, when the weights are on this machine, the layer count and width against
the tensors the files actually hold, so that a config that promises more than its weights is refused
in one line before any memory is spent.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from quantlab.errors import ModelLoadError
from quantlab.models.paths import printable, require_regular_file
from quantlab.models.weightfiles import _NOT_JSON, TensorListing, parse_json

MAX_CONFIG_BYTES = 4 * 2**20  # real configs are a few KiB; tokenizer-sized ones are not configs
# Integer fields a builder allocates from, with the largest value any released model uses, rounded up
# generously (Llama-4's 10M-token context fits under the position bound; 70B+ models have <= 160 layers).
INT_BOUNDS = {
    "num_hidden_layers": 1024, "n_layer": 1024, "num_layers": 1024,
    "hidden_size": 2**17, "n_embd": 2**17, "d_model": 2**17,
    "intermediate_size": 2**20, "n_inner": 2**20, "ffn_dim": 2**20,
    "num_attention_heads": 4096, "n_head": 4096, "num_key_value_heads": 4096, "head_dim": 2**14,
    "vocab_size": 2**24, "max_position_embeddings": 2**28, "n_positions": 2**28, "n_ctx": 2**28,
}
LAYER_FIELDS = ("num_hidden_layers", "n_layer", "num_layers")
WIDTH_FIELDS = ("hidden_size", "n_embd", "d_model")
_EMBEDDING_NAMES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def read_config(folder: Path) -> dict:
    """``folder/config.json`` as a dict, with every field QuantLab or a builder relies on checked."""
    path = folder / "config.json"
    if require_regular_file(path) > MAX_CONFIG_BYTES:
        raise ModelLoadError(f"{printable(folder.name)}/config.json has more than {MAX_CONFIG_BYTES // 2**20} MiB: "
                             "not a model config")
    config = parse_json(path.read_bytes())
    if config is _NOT_JSON or not isinstance(config, dict):
        raise ModelLoadError(f"{printable(folder.name)}/config.json is not a JSON object (damaged, or nested "
                             "too deeply); save the config again")
    check_config(config, f"{printable(folder.name)}/config.json")
    return config


def check_config(config: dict, name: str = "config.json") -> None:
    """Types and bounds of the fields in ``config`` (a config's dict); ModelLoadError naming the first bad one."""
    model_type = config.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise ModelLoadError(f"{name}: model_type must be a string, got {_shown(model_type)}")
    heads = config.get("architectures")
    if heads is not None and not (isinstance(heads, list) and all(isinstance(h, str) and h for h in heads)):
        raise ModelLoadError(f"{name}: architectures must be a list of class names, got {_shown(heads)}")
    for key in ("torch_dtype", "dtype"):
        value = config.get(key)
        if value is not None and not _is_dtype_name(value):
            raise ModelLoadError(f"{name}: {key} {_shown(value)} is not a torch dtype; use float32, float16 "
                                 "or bfloat16")
    for key, bound in INT_BOUNDS.items():
        value = config.get(key)
        if value is None:
            continue
        low = 0 if key in LAYER_FIELDS else 1  # no blocks is a model with nothing to quantize, said later
        if type(value) is not int or not low <= value <= bound:  # type(): JSON true is a bool, not a count
            raise ModelLoadError(f"{name}: {key} must be a whole number from {low} to {bound:,}, got {_shown(value)}")


def check_against_weights(config: dict, listing: TensorListing, name: str = "config.json") -> None:
    """A config may not promise more layers, or wider ones, than its weights files hold."""
    layers = next((config[k] for k in LAYER_FIELDS if isinstance(config.get(k), int)), None)
    stored = {int(m[1]) for t in listing.tensors if (m := _LAYER_INDEX.search(t.name))}
    if layers is not None and stored and layers > max(stored) + 1:
        raise ModelLoadError(f"{name} says {layers:,} layers but the weights hold {max(stored) + 1}; the config "
                             "belongs to another model (or was edited)")
    width = next((config[k] for k in WIDTH_FIELDS if isinstance(config.get(k), int)), None)
    embedding = next((t for t in listing.tensors if t.name.endswith(_EMBEDDING_NAMES) and len(t.shape) == 2), None)
    if width is not None and embedding is not None and embedding.shape[1] != width:
        raise ModelLoadError(f"{name} says the hidden size is {width:,} but {printable(embedding.name)} is "
                             f"{embedding.shape[0]}x{embedding.shape[1]}; the config belongs to another model")
    # Every block holds at least its query and output projections, 2 * width**2 weights; a checkpoint packed
    # at 2 bits stores 16 of them per int32 element, hence the slack of 8 (still far below a config's lie).
    if layers is not None and width is not None and layers * width * width > 8 * listing.total_params:
        raise ModelLoadError(f"{name} describes {layers:,} layers of width {width:,}, more than the "
                             f"{listing.total_params:,} weights its files hold; the config belongs to another model")


def _is_dtype_name(value) -> bool:
    if not isinstance(value, str) or value == "auto":
        return value == "auto"
    return isinstance(getattr(torch, value.removeprefix("torch."), None), torch.dtype)


def _shown(value) -> str:
    return printable(repr(value))[:60]
