"""Open a checkpoint without reading its blocks, and read one block at a time: sequential onloading.

For a model larger than memory (a Llama-3-8B in bf16 is 16 GB), ``open_lazy`` builds the model's
modules with accelerate's ``init_empty_weights`` (parameters on the ``meta`` device, buffers such
as the rotary frequencies real) and reads from the checkpoint only what runs before the first
block: the embeddings (and the other small tensors outside the blocks, the output head excepted).
``load_block`` then reads one block's tensors from their safetensors memory maps into a fresh
copy of that block on the run's device, with accelerate's ``set_module_tensor_to_device``; the
caller drops the block when it is done with it, and its memory goes with it.

What the libraries do and what is written here: the empty model and the per-tensor placement are
accelerate's; the memory maps are safetensors' ``safe_open``. compressed-tensors' offloading
(``load_offloaded_model`` with ``device_map="disk"``, its ``DiskCache``) is not used: it onloads each
submodule's weights inside its forward and writes changed tensors to an offload folder, while
QuantLab's runner works on a private copy of a whole block (weights read by GPTQ, changed by AWQ)
and never writes back. Written by hand: which tensors are a block's, the copy per block, and the
checks that every tensor is in the files.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quantlab.device import resolve_device
from quantlab.errors import ModelLoadError
from quantlab.models import loading
from quantlab.models.architectures import ModelStructure, describe
from quantlab.models.paths import printable
from quantlab.models import stored_formats
from quantlab.models.prequantized import quantization_config, stored_layers
from quantlab.models.weightfiles import SAFETENSORS_SUFFIXES, read_header, weight_files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LazyModel:
    """A model whose blocks stay in the checkpoint's files until ``load_block`` reads one."""

    model: nn.Module  # blocks and output head on meta; embeddings, norms and buffers real, on ``device``
    tokenizer: object | None
    name: str  # for display
    source: str  # the checkpoint folder
    structure: ModelStructure
    locations: dict[str, Path]  # stored tensor name -> the safetensors file that holds it
    dtype: torch.dtype  # what floating tensors are cast to as they are read
    device: torch.device  # where blocks are loaded
    stored: dict | None = None  # a pre-quantized checkpoint's quantization config: its linears are dequantized

    @property
    def checkpoint_bytes(self) -> int:
        return sum(path.stat().st_size for path in set(self.locations.values()))

    def block_prefix(self, index: int) -> str:
        return f"{self.structure.block_path}.{index}."

    def outside_blocks(self) -> list[str]:
        """Stored tensors outside the blocks (embeddings, final norm, an untied head), in file order."""
        prefix = f"{self.structure.block_path}."
        return [name for name in self.locations if not name.startswith(prefix)]


def read_tensors(lazy: LazyModel, names: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors as private CPU copies, read through each file's memory map.

    ``safe_open`` tensors are views of the map; they are copied, so that a block's pages leave the
    process with the block (and an in-place change, as AWQ's folding, never meets a read-only map).
    """
    missing = [name for name in names if name not in lazy.locations]
    if missing:
        raise ModelLoadError(f"{printable(lazy.source)}: {len(missing)} tensors of the model are not in its "
                             f"safetensors files (e.g. {printable(missing[0])}); the checkpoint is incomplete")
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(lazy.locations[name], []).append(name)
    out = {}
    for path, file_names in by_file.items():
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for name in file_names:
                out[name] = handle.get_tensor(name).clone()
    return out


def _place(module: nn.Module, tensors: dict[str, torch.Tensor], lazy: LazyModel) -> None:
    """Put each tensor (keys relative to ``module``) in place on the device; floats cast to the load dtype."""
    from accelerate.utils import set_module_tensor_to_device

    for key, value in tensors.items():
        dtype = lazy.dtype if value.is_floating_point() else None
        set_module_tensor_to_device(module, key, lazy.device, value=value, dtype=dtype)


def load_block(lazy: LazyModel, index: int) -> nn.Module:
    """Block ``index`` with its weights read from the files: a new module, the lazy model is not changed."""
    block = copy.deepcopy(lazy.structure.blocks(lazy.model)[index])  # on meta: a few Python objects
    prefix = lazy.block_prefix(index)
    keys = list(block.state_dict())
    dequantized = _stored_weights(lazy, prefix, keys)
    plain = [key for key in keys if key not in dequantized]
    tensors = read_tensors(lazy, [prefix + key for key in plain])
    _place(block, {key: tensors.pop(prefix + key) for key in plain} | dequantized, lazy)
    left = [name for name, t in (*block.named_parameters(), *block.named_buffers()) if t.is_meta]
    if left:
        raise ModelLoadError(f"block {index} of {printable(lazy.source)} has tensors the checkpoint does not hold "
                             f"({', '.join(left[:3])}); it cannot be loaded block by block")
    return block.eval().requires_grad_(False)


def _stored_weights(lazy: LazyModel, prefix: str, keys: list[str]) -> dict[str, torch.Tensor]:
    """A pre-quantized block's linear weights (key relative to the block -> fp32 weight), dequantized
    from the stored codes one layer at a time; {} for a full-precision checkpoint."""
    if lazy.stored is None:
        return {}
    wanted = {prefix + key.removesuffix(".weight") for key in keys
              if key.endswith(".weight") and prefix + key not in lazy.locations}
    layers = stored_layers(lazy.source, lazy.stored, wanted)
    return {layer.name.removeprefix(prefix) + ".weight": layer.weight() for layer in layers}


def load_head(lazy: LazyModel) -> None:
    """Read the output head into the lazy model (evaluation needs it; calibration stops before it).
    A tied head shares the input embedding, as in the full model."""
    head = lazy.model.get_output_embeddings() if hasattr(lazy.model, "get_output_embeddings") else None
    if head is None or not head.weight.is_meta:
        return
    name = next(f"{n}.weight" for n, module in lazy.model.named_modules() if module is head)
    if name in lazy.locations:
        _place(lazy.model, read_tensors(lazy, [name]), lazy)
    elif getattr(lazy.model.config, "tie_word_embeddings", False):
        head.weight = lazy.model.get_input_embeddings().weight
    else:
        raise ModelLoadError(f"{printable(lazy.source)}: the output head {printable(name)} is not in the checkpoint's "
                             "files and the config does not tie it to the embeddings")


def _check_folder(resolved: str, config) -> list[Path]:
    folder = Path(resolved)
    if not folder.is_dir():
        raise ModelLoadError(f"sequential onloading reads a local model folder; {printable(resolved)} is not one "
                             "(download it first, e.g. `hf download ID --local-dir DIR`)")
    files = weight_files(folder)
    if not files or any(path.suffix not in SAFETENSORS_SUFFIXES for path in files):
        raise ModelLoadError(f"{printable(folder.name)}: sequential onloading needs safetensors weights (memory-mapped "
                             "block by block); convert .bin weights to safetensors first")
    return files


def _stored_config(config, folder: str, prequantized_ok: bool) -> dict | None:
    """A pre-quantized checkpoint's quantization config, taken out of ``config`` so that the plain
    architecture is built (its linears are dequantized as blocks are read); None for full precision."""
    if quantization_config(config) is None:
        return None
    if not prequantized_ok:
        raise ModelLoadError(f"{printable(Path(folder).name)} is pre-quantized; sequential quantization reads "
                             "full-precision checkpoints (load it in memory instead: its dequantized weights are quantized)")
    route = stored_formats.route_for(config)  # checks the format: an unreadable one is one line
    if route.qconfig is None:
        raise ModelLoadError(f"{printable(Path(folder).name)} is stored as {stored_formats.quant_format(config)}, "
                             "which transformers decompresses as it loads; evaluate it in memory (without --sequential)")
    return route.qconfig


def open_lazy(source: str | Path | None, device=None, dtype="auto", trust_remote_code: bool = False,
              prequantized_ok: bool = False) -> LazyModel:
    """The model of a local safetensors folder with only what runs before its first block in memory.

    ``prequantized_ok``: a compressed-tensors (integer), GPTQ or AWQ checkpoint opens too, each
    block's linears dequantized from the stored codes as it is read (sequential evaluation).
    """
    from accelerate import init_empty_weights
    from transformers import AutoModel, AutoModelForCausalLM

    if dtype is not None and not (isinstance(dtype, str) and dtype.lower() == "auto"):
        loading._torch_dtype(dtype)  # a bad dtype is reported before anything is read
    target = resolve_device(device if device is None else str(device))
    resolved, download = loading._prepare(source)
    config = loading._load_config(resolved, trust_remote_code, not download)
    files = _check_folder(resolved, config)
    stored = _stored_config(config, resolved, prequantized_ok)
    locations = {info.name: path for path in files for info in read_header(path)}
    torch_dtype = loading._torch_dtype(dtype, config)
    auto = AutoModelForCausalLM if loading.model_kind(config) == "causal" else AutoModel
    try:
        with init_empty_weights():  # parameters on meta; buffers (rotary inv_freq) computed for real
            model = auto.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except loading._LOAD_ERRORS as exc:
        raise ModelLoadError(f"cannot build {printable(resolved)} from its config: {loading._first_line(exc)}") from None
    structure = describe(model)
    if structure.block_path is None or not structure.linears:
        raise ModelLoadError(f"{printable(resolved)} has no linear layers inside transformer blocks: nothing to quantize")
    lazy = LazyModel(model.eval().requires_grad_(False), loading._load_tokenizer(resolved, not download),
                     loading.display_name(source), resolved, structure, locations, torch_dtype, target, stored)
    _load_outside_blocks(lazy)
    log.info("%s: opened lazily, %d blocks left in %d files (%.2f GB)", lazy.name, structure.n_blocks, len(files),
             lazy.checkpoint_bytes / 1e9)
    return lazy


def _load_outside_blocks(lazy: LazyModel) -> None:
    """Read the tensors outside the blocks, but the output head (calibration stops at the blocks)."""
    head = lazy.model.get_output_embeddings() if hasattr(lazy.model, "get_output_embeddings") else None
    head_keys = {f"{name}.weight" for name, module in lazy.model.named_modules() if module is head}
    wanted = [name for name in lazy.model.state_dict() if not name.startswith(f"{lazy.structure.block_path}.")
              and name not in head_keys and name in lazy.locations]
    _place(lazy.model, read_tensors(lazy, wanted), lazy)
    for name, buffer in list(lazy.model.named_buffers()):  # non-persistent buffers (rotary) follow the device
        if not buffer.is_meta and buffer.device != lazy.device:
            from accelerate.utils import set_module_tensor_to_device

            set_module_tensor_to_device(lazy.model, name, lazy.device, value=buffer)
