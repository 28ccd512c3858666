"""Load the model to quantize: a bundled model, a local folder, a Hugging Face id or bare weights files.

Everything that goes wrong on the way (no network, an unknown or gated id, a corrupt file, a model
with nothing to quantize) becomes a ``ModelLoadError`` whose message says what to do instead.
Hub ids are tried from the local cache first; when they are not cached, one short request to the
hub (``HUB_TIMEOUT_S``) decides between "unknown id", "gated" and "offline" before any download,
so that a machine without network fails in well under a second instead of hanging.

Loaded models are in eval mode with ``requires_grad`` off; quantize a ``copy_model`` of them, never
the original (the app shares one loaded model between all sessions).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import get_safetensors_metadata, model_info, try_to_load_from_cache
from huggingface_hub.errors import (
    GatedRepoError, HfHubHTTPError, HFValidationError, NotASafetensorsRepoError, RepositoryNotFoundError,
    SafetensorsParsingError,
)
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from quantlab.models.architectures import ARCHITECTURES, ModelStructure, describe, find_linears
from quantlab.models.configcheck import check_against_weights, check_config, read_config
from quantlab.models.paths import AccessPolicy, allowed_path, file_kind, printable
from quantlab.device import resolve_device
from quantlab.errors import ModelLoadError, is_library_panic
from quantlab.models import memory, stored_formats
from quantlab.models.prequantized import StoredQuantization
from quantlab.models.sources import BUNDLED_ENCODER, BUNDLED_LM, display_name, is_bundled, resolve_source
from quantlab.models.sizing import LayerSize, ModelSize, model_size, reference_size
from quantlab.models.weightfiles import (
    PICKLE_SUFFIXES, SAFETENSORS_DTYPES, SAFETENSORS_SUFFIXES, TensorInfo, TensorListing, dtype_name, list_files,
    load_files, local_path, map_tensors, matrix_tensors, natural_key, read_header, skipped_tensors, tensor_info,
    weight_files,
)

__all__ = [  # the loading API, plus the file and size helpers re-exported so callers need one import
    "BUNDLED_ENCODER", "BUNDLED_LM", "HUB_SUGGESTIONS", "LayerSize", "LoadedModel", "ModelSize", "TensorInfo",
    "TensorListing", "copy_model", "display_name", "hub_offline", "inspect_tensors", "is_bundled",
    "is_weights_source", "load_model", "local_path", "map_tensors", "load_tensors", "matrix_tensors", "model_kind",
    "model_size", "model_skeleton", "read_header", "reference_size", "resolve_source", "skipped_tensors", "weight_files",
]

log = logging.getLogger(__name__)

HUB_SUGGESTIONS = (
    "gpt2", "facebook/opt-125m", "EleutherAI/pythia-160m", "HuggingFaceTB/SmolLM2-135M",
    "Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.2-1B",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")
HUB_TIMEOUT_S = 5.0  # the one probe request: long enough for a slow link, short enough not to look hung
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
# Model types whose plain checkpoints are encoders even without an architectures entry.
ENCODER_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "mpnet", "deberta",
                           "deberta-v2", "camembert", "modernbert"})
_ENCODER_HEADS = ("ForMaskedLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")
_CAUSAL_HEADS = ("ForCausalLM", "LMHeadModel")
# The hub client's transport errors: its HTTP library's base class (a detail that changes between
# releases, hence read from the hub's own error type) plus OSError for sockets and DNS.
_NETWORK_ERRORS = (OSError, *HfHubHTTPError.__bases__)
_OFFLINE_CHOICES = (
    f"use a bundled model ({BUNDLED_LM} or {BUNDLED_ENCODER}), a local model folder, "
    "or upload a .safetensors file"
)


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to evaluate or copy and quantize."""

    model: nn.Module  # eval mode, requires_grad off, on the requested device
    tokenizer: object | None  # a Hugging Face tokenizer, None when the folder has none
    kind: str  # "causal" | "encoder"
    name: str  # for display: bundled name, hub id or folder name
    source: str  # the resolved folder or hub id it was loaded from
    stored: StoredQuantization | None = None  # set for a pre-quantized checkpoint (weights dequantized)

    def __post_init__(self) -> None:
        if self.kind not in ("causal", "encoder"):
            raise ModelLoadError(f"model kind must be causal or encoder, got {self.kind!r}")

    @functools.cached_property
    def structure(self) -> ModelStructure:
        """Blocks, linears and norms of ``model``, walked once and shared by every run on it."""
        return describe(self.model)


def copy_model(loaded: LoadedModel) -> LoadedModel:
    """A deep copy to quantize: the original's weights are never touched. Tied weights stay tied."""
    return dataclasses.replace(loaded, model=copy.deepcopy(loaded.model))


def _torch_dtype(dtype, config=None) -> torch.dtype:
    """The dtype to load in; ``"auto"`` (or None) is the checkpoint's own float dtype, fp32 when it names none."""
    if dtype is None or (isinstance(dtype, str) and dtype.lower() == "auto"):
        stored = getattr(config, "dtype", None) if config is not None else None
        if isinstance(stored, str):
            stored = DTYPES.get(stored.lower())
        return stored if stored in DTYPES.values() else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ModelLoadError(f"cannot load a model in {dtype}; use auto, fp32, fp16 or bf16")


def _is_local(source: str) -> bool:
    """A path that exists, or text that can only be a path (so a typo is not sent to the hub)."""
    path = Path(source).expanduser()
    if file_kind(path) != "missing":
        return True
    looks_like_path = source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source
    if looks_like_path or path.suffix in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES + (".json",):
        raise ModelLoadError(f"no such file or folder: {printable(source)[:200]}")
    return False


def _local_path(source: str) -> Path:
    """A local source, resolved and checked by the policy (``QUANTLAB_LOCAL_ROOTS`` when set)."""
    return allowed_path(Path(source).expanduser(), AccessPolicy.for_cli())


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now or when the hub client was imported."""
    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return hub_constants.HF_HUB_OFFLINE or any(f and f.lower() in ("1", "true", "yes", "on") for f in flags)


def check_hub_id(repo_id: str) -> bool:
    """Whether ``repo_id`` must be fetched from the hub (True) or is in the local cache (False).

    Raises ModelLoadError, fast, when it is neither cached nor reachable, unknown, or gated.
    """
    try:
        cached = isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except (HFValidationError, OSError):  # OSError: a name too long for the cache's file system
        raise ModelLoadError(f"{printable(repr(repo_id))[:120]} is not a folder, a weights file or a valid hub id "
                             "(org/name)") from None
    if cached:
        return False
    if hub_offline():
        raise ModelLoadError(f"{repo_id} is not in the local cache and the hub is offline (HF_HUB_OFFLINE); "
                             + _OFFLINE_CHOICES)
    try:
        model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        raise ModelLoadError(f"{repo_id} is gated: accept its license on huggingface.co and run `hf auth login`, "
                             "or " + _OFFLINE_CHOICES) from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"no model {repo_id!r} on the hub (check the spelling; private models need "
                             f"`hf auth login`); try one of {', '.join(HUB_SUGGESTIONS)}") from None
    except _NETWORK_ERRORS as exc:
        raise ModelLoadError(f"cannot reach the Hugging Face hub for {repo_id} ({type(exc).__name__}); "
                             + _OFFLINE_CHOICES) from None
    return True


def _validate_folder(folder: Path) -> None:
    """Check a folder's safetensors headers first, so a corrupt file is named, not a deep traceback."""
    for path in sorted(folder.glob("*.safetensors")):
        read_header(path)


# What transformers raises on a config or checkpoint it cannot use: anything a parser can trip on.
_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, AssertionError,
                RuntimeError, RecursionError, OverflowError, SafetensorError)


def _load_config(source: str, trust_remote_code: bool, local_files_only: bool):
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code,
                                            local_files_only=local_files_only)
    except _LOAD_ERRORS as exc:
        hint = "" if trust_remote_code else " (custom architectures need trust_remote_code, off by default)"
        raise ModelLoadError(f"cannot read the config of {printable(source)}: {_first_line(exc)}{hint}") from None
    check_config(config.to_dict(), f"the config of {printable(source)}")  # a hub config gets the same bounds
    return config


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if "above report" in text:  # transformers' size mismatch: its report went to the log, shown with -v
        return "the weights' shapes do not match the config (a config from another model?); -v shows the report"
    return printable(text.splitlines()[0][:300]) if text else type(exc).__name__


def _check_local_config(folder: Path) -> None:
    """config.json's types and bounds, and (safetensors weights) its layers against the stored tensors."""
    config = read_config(folder)
    files = weight_files(folder) if any(folder.glob("*.safetensors*")) else []
    if files and all(f.suffix in SAFETENSORS_SUFFIXES for f in files):
        check_against_weights(config, list_files(files), f"{printable(folder.name)}/config.json")


def model_kind(config) -> str:
    """``"causal"`` or ``"encoder"`` from a config: its heads, then the architecture table, then its type."""
    heads = tuple(config.architectures or ())
    if any(h.endswith(_CAUSAL_HEADS) for h in heads):
        return "causal"
    spec = ARCHITECTURES.get(config.model_type)
    if spec is not None:
        return spec.kind
    if config.model_type in ENCODER_TYPES or any(h.endswith(_ENCODER_HEADS) for h in heads):
        return "encoder"
    return "causal"


def _prepare(source: str | Path | None) -> tuple[str, bool]:
    """The resolved source and whether transformers may download (False: local files only)."""
    resolved = resolve_source(source)
    if _is_local(resolved):
        path = _local_path(resolved)
        if not (path / "config.json").is_file():
            what = "is a bare weights file" if path.is_file() else "has no config.json"
            raise ModelLoadError(
                f"{printable(str(path))} {what}, so it cannot run as a model; bare weights can still be inspected, "
                "sized and their matrices quantized one by one; to run it, put its config.json next to the weights"
            )
        _validate_folder(path)
        _check_local_config(path)
        return str(path), False
    return resolved, check_hub_id(resolved)


def load_model(source: str | Path | None = None, device=None, dtype="auto",
               trust_remote_code: bool = False) -> LoadedModel:
    """Load a causal LM or encoder from a bundled name, folder or hub id (default: the bundled LM).

    ``dtype`` "auto" keeps the checkpoint's dtype (a bf16 checkpoint stays bf16: half the memory of
    fp32, and the numerics that need fp32 cast each layer's weights and statistics themselves).

    A pre-quantized checkpoint (compressed-tensors, GPTQ, AWQ) opens with its stored codes
    dequantized into the full-precision architecture (the route: :mod:`quantlab.models.stored_formats`).
    """
    if dtype is not None and not (isinstance(dtype, str) and dtype.lower() == "auto"):
        _torch_dtype(dtype)  # a bad dtype is reported before anything is read
    target = resolve_device(device if device is None else str(device))
    resolved, download = _prepare(source)
    config = _load_config(resolved, trust_remote_code, not download)
    torch_dtype = _torch_dtype(dtype, config)
    route = stored_formats.route_for(config)  # pre-quantized: which reader (quantlab.models.stored_formats)
    # A model too large for the free memory is refused here, before the OOM killer takes the server.
    memory.check_fits(resolved, config, model_kind(config), torch_dtype, target, trust_remote_code)
    model, info = _from_pretrained(resolved, config, torch_dtype, trust_remote_code, download, route)
    stored, missing = stored_formats.fill(model, resolved, route, info.get("missing_keys"))
    if missing:
        log.warning("%s: %d weights missing from the checkpoint were initialised at random: %s",
                    resolved, len(missing), missing[:5])
    if not find_linears(model):
        raise ModelLoadError(f"{resolved} has no linear layers inside transformer blocks: nothing to quantize")
    model.eval().requires_grad_(False).to(target)
    stored_formats.finish(model, route, torch_dtype)
    return LoadedModel(model, _load_tokenizer(resolved, not download), model_kind(config), display_name(source),
                       resolved, stored)


def _from_pretrained(resolved: str, config, torch_dtype, trust_remote_code: bool, download: bool,
                     route: stored_formats.StoredRoute):
    """transformers' loader with its errors as ModelLoadError, the route's options, and its missing-key
    report hidden when the route fills the quantized layers itself."""
    from transformers.utils import logging as transformers_logging

    auto = AutoModelForCausalLM if model_kind(config) == "causal" else AutoModel
    verbosity = transformers_logging.get_verbosity()
    if route.quiet:
        transformers_logging.set_verbosity_error()
    try:
        return auto.from_pretrained(
            resolved, config=config, dtype=torch_dtype, trust_remote_code=trust_remote_code,
            local_files_only=not download, output_loading_info=True, **route.loader_options,
        )
    except pickle.UnpicklingError:  # transformers reads .bin with weights_only=True, as load_pickled does
        raise ModelLoadError(f"refused to load {resolved}: its .bin weights hold Python objects or code, not just "
                             "tensors; convert them to safetensors from a trusted environment") from None
    except _LOAD_ERRORS as exc:
        raise ModelLoadError(f"cannot load the weights of {printable(resolved)}: {_first_line(exc)}") from None
    finally:
        transformers_logging.set_verbosity(verbosity)


def _load_tokenizer(source: str, local_files_only: bool):
    folder = Path(source)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        # Without these files transformers builds a tokenizer with only special tokens: worse than none.
        log.warning("%s has no tokenizer files; text evaluation will not be available", source)
        return None
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
    except BaseException as exc:  # noqa: BLE001  the Rust tokenizer's panics derive from BaseException
        if not isinstance(exc, _LOAD_ERRORS) and not is_library_panic(exc):
            raise
        log.warning("%s: no usable tokenizer (%s); text evaluation will not be available", source, _first_line(exc))
        return None


def model_skeleton(source: str | Path | None = None, trust_remote_code: bool = False) -> nn.Module:
    """The model's modules on the ``meta`` device, from its config alone: shapes without weights.

    Enough for size accounting of any model, however large, without downloading its weights.
    """
    resolved, download = _prepare(source)
    config = _load_config(resolved, trust_remote_code, not download)
    auto = AutoModelForCausalLM if model_kind(config) == "causal" else AutoModel
    stored = config.dtype if isinstance(config.dtype, torch.dtype) else torch.float32
    try:
        with torch.device("meta"):
            model = auto.from_config(config, dtype=stored, trust_remote_code=trust_remote_code)
    except _LOAD_ERRORS as exc:
        raise ModelLoadError(f"cannot build {printable(resolved)} from its config: {_first_line(exc)}") from None
    if not find_linears(model):
        raise ModelLoadError(f"{resolved} has no linear layers inside transformer blocks: nothing to quantize")
    return model


def is_weights_source(source) -> bool:
    """True for bare weights (files, an index, a folder without config.json), False for a model."""
    if isinstance(source, (list, tuple)):
        return True
    resolved = resolve_source(source)
    if not _is_local(resolved):
        return False
    path = Path(resolved).expanduser()
    return path.is_file() or not (path / "config.json").is_file()


def inspect_tensors(source) -> TensorListing:
    """Every stored tensor (name, shape, dtype, bytes) of weights files, a folder, a hub id or a model.

    Safetensors are read from their headers, so listing a large checkpoint costs almost nothing.
    """
    if isinstance(source, TensorListing):  # already listed (the app lists an upload once, then sizes it)
        return source
    if isinstance(source, LoadedModel):
        source = source.model
    if isinstance(source, nn.Module):
        return TensorListing.of(tensor_info(n, t) for n, t in _unique_state(source).items())
    if isinstance(source, (list, tuple)):
        return list_files([Path(p) for p in source])
    resolved = resolve_source(source)
    if _is_local(resolved):
        return list_files(weight_files(_local_path(resolved)))
    if not check_hub_id(resolved):
        return list_files(weight_files(Path(try_to_load_from_cache(resolved, "config.json")).parent))
    return _hub_listing(resolved)


def _hub_listing(repo_id: str) -> TensorListing:
    """Tensor headers read remotely (HTTP range requests): no weights are downloaded."""
    try:
        metadata = get_safetensors_metadata(repo_id)
    except NotASafetensorsRepoError:
        raise ModelLoadError(f"{repo_id} has no safetensors weights on the hub; load it, or download and "
                             "inspect its folder") from None
    except (SafetensorsParsingError, *_NETWORK_ERRORS) as exc:
        raise ModelLoadError(f"cannot list the tensors of {repo_id}: {_first_line(exc)}") from None
    infos = []
    for file_meta in metadata.files_metadata.values():
        for name, t in file_meta.tensors.items():
            begin, end = t.data_offsets
            infos.append(TensorInfo(name, tuple(t.shape), dtype_name(SAFETENSORS_DTYPES[t.dtype]), end - begin))
    return TensorListing.of(sorted(infos, key=lambda info: natural_key(info.name)))


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors once (as ``save_pretrained`` writes them)."""
    seen, unique = set(), {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            unique[name] = tensor.detach()
    return unique


def load_tensors(source) -> dict[str, torch.Tensor]:
    """All tensors of weights files, a folder, or a model, on the CPU (safetensors or weights-only pickles)."""
    if isinstance(source, LoadedModel):
        source = source.model
    if isinstance(source, nn.Module):
        return {name: t.cpu() for name, t in _unique_state(source).items()}
    if isinstance(source, (list, tuple)):
        return load_files([Path(p) for p in source])
    resolved = resolve_source(source)
    if _is_local(resolved):
        return load_files(weight_files(_local_path(resolved)))
    return load_tensors(load_model(resolved).model)
