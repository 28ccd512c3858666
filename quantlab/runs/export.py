"""Export a weight-quantized model as a compressed-tensors ``pack-quantized`` checkpoint.

(NVFP4 and MXFP4 runs go to ``nvfp4-pack-quantized`` / ``mxfp4-pack-quantized`` instead, through the
library's own compressors: :mod:`quantlab.runs.blockexport`.)

vLLM and transformers (through the compressed-tensors library) load this format. Per quantized
linear ``NAME`` the folder holds::

    NAME.weight_packed      int32 (out, ceil(in * bits / 32)): codes packed densely, 32 codes per bits words
    NAME.weight_scale       (out, groups) for groups, (out, 1) per channel, (1,) per tensor; the scale dtype
    NAME.weight_zero_point  int32, zero-points packed along the output dimension (asymmetric only)
    NAME.weight_shape       int64 (2,): (out, in)

and ``config.json`` gains a ``quantization_config`` (``quant_method: compressed-tensors``,
``format: pack-quantized``, one config group with num_bits/type/symmetric/strategy/group_size,
``ignore`` listing the linears left in full precision). Everything else (embeddings, norms, an
untied lm_head, biases) is saved as it is, tied tensors once; the tokenizer is saved beside it.

What the library does and what is written here: packing (``pack_to_int32``), the scheme and config
objects (``QuantizationArgs``/``QuantizationScheme``/``QuantizationConfig``) and writing the config
into config.json (``ModelCompressor.update_config``) are compressed-tensors'. Its own ``compress``
is not used because it re-derives the codes from a float weight; QuantLab already has the exact
codes, so they are converted here and packed directly, which keeps the file bit-exact. Written by
hand: that conversion, the choice of tensors to save, sharding and the folder handling.

Integer conventions: compressed-tensors stores codes and zero-points as signed ``b``-bit integers
in [-2^(b-1), 2^(b-1)-1] and dequantizes ``(q - z) * s``. QuantLab's symmetric codes use that same
full range by default (and its scale rule, absmax / 7.5 at INT4), or the restricted range
[-(2^(b-1)-1), 2^(b-1)-1] inside it; both are stored unchanged. Its asymmetric codes and
zero-points lie in [0, 2^b-1] and are both shifted by -2^(b-1), which leaves ``q - z`` and so
every dequantized value exactly as it was. ``quantization_config.quantlab`` says which range and
scale rule made the codes (compressed-tensors ignores the key); ``read_compressed`` reads an
export back into QuantLab's ``Quantized`` codes and scales, bit for bit.

Known limit of the loaders (not of the file): transformers 5 with compressed-tensors 0.20 expects
unpacked zero-points when it builds the model, so asymmetric checkpoints load with the library's
decompression and in vLLM but not through ``AutoModelForCausalLM`` (llm-compressor issue #1618).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quantlab.errors import FormatError
from quantlab.numerics.formats import SCALE_DTYPES, Granularity, QuantFormat
from quantlab.numerics.primitives import QParams, Quantized
from quantlab.models.quantized import QuantizedLinear
from quantlab.runs.blockexport import block_layer_tensors, block_quantization_config, check_exportable
from quantlab.runs.exportconfig import format_groups, int_quantization_config, mixed_quantization_config

log = logging.getLogger(__name__)

# transformers classes of these model types hold their linears as Conv1D, weight (in, out), which
# compressed-tensors' "Linear" target does not match: their export would not load anywhere.
CONV1D_MODEL_TYPES = ("gpt2",)
MAX_SHARD_SIZE = "5GB"  # transformers' default shard size


@dataclass(frozen=True)
class ExportResult:
    """What ``export_compressed`` wrote."""

    path: Path
    files: tuple[str, ...]  # every file in the folder
    quantized_layers: tuple[str, ...]
    ignored: tuple[str, ...]  # linears left in full precision (in ``quantization_config.ignore``)
    weights_bytes: int  # the .safetensors files on disk, headers included
    folder_bytes: int  # everything: weights, config.json, generation config, tokenizer files
    seconds: float
    quantization_config: dict


def export_compressed(model: nn.Module, out_dir: str | Path, tokenizer=None,
                      max_shard_size: int | str = MAX_SHARD_SIZE) -> ExportResult:
    """Write ``model`` (holding ``QuantizedLinear`` layers) to a new folder ``out_dir``.

    Refuses an existing non-empty folder, and writes into a temporary folder beside it that is
    renamed at the end, so a failure never leaves a half-written export or touches other files.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    check_output_folder(out)
    quantized = _quantized_modules(model)
    groups = format_groups(quantized)
    ignored = tuple(name for name, m in model.named_modules() if isinstance(m, nn.Linear))
    if len(groups) > 1:  # a mixed-precision plan: one config group per format, targeting its layers by name
        config = mixed_quantization_config(groups, ignored)
    else:
        fmt = next(iter(groups.values()))[0]
        config = block_quantization_config(fmt, ignored) if fmt.is_block_scaled else int_quantization_config(fmt, ignored)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        weight_files = _write_weights(model, quantized, staging, max_shard_size)
        _write_config(model, config, staging, [fmt for fmt, _ in groups.values()])
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if out.exists():
            out.rmdir()  # empty, as checked: the finished export takes its place
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = tuple(sorted(p.name for p in out.iterdir()))
    return ExportResult(
        out, files, tuple(quantized), ignored, sum((out / f).stat().st_size for f in weight_files),
        sum(p.stat().st_size for p in out.iterdir() if p.is_file()), time.perf_counter() - start,
        json.loads((out / "config.json").read_text())["quantization_config"],
    )


def check_output_folder(out: Path) -> None:
    """An export goes to a new or empty folder in a writable place: nothing already there is ever overwritten."""
    shown = str(out).encode("ascii", "backslashreplace").decode("ascii")[:200]
    try:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            kind = "folder is not empty" if out.is_dir() else "path is a file"
            raise FormatError(f"{shown}: the {kind}; choose a new folder for the export (nothing was written)")
        folder = next(p for p in (out, *out.parents) if p.exists())
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise FormatError(f"cannot export to {shown}: {folder} is not a writable folder; choose another place")
    except OSError as exc:  # a name too long, a loop in the path's links, a folder that cannot be listed
        raise FormatError(f"cannot export to {shown} ({exc.strerror or exc}); choose another folder") from None


def _quantized_modules(model: nn.Module) -> dict[str, QuantizedLinear]:
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    if model_type in CONV1D_MODEL_TYPES:
        raise FormatError(f"{model_type} stores its linears as Conv1D, which compressed-tensors checkpoints cannot "
                          "describe; export a Llama-, OPT-, NeoX- or BERT-style model")
    found = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    if not found:
        raise FormatError("the model has no quantized linear layers; export the model a quantization run returns")
    for name, module in found.items():
        if module.fmt.is_block_scaled:
            check_exportable(name, module.fmt)
        elif module.fmt.kind != "int":
            raise FormatError(f"{name} is {module.fmt.name}; pack-quantized holds integer formats "
                              "(int2..int8), and nvfp4-/mxfp4-pack-quantized NVFP4 and MXFP4; not FP8 or NF4")
        if module.input_transform is not None:
            raise FormatError(f"{name} rotates its input online (the Hadamard a rot- configuration puts before "
                              "down_proj), which a checkpoint written here would not carry; export a rot1- run "
                              "(the residual rotation alone, fused into the weights) or one without rotation")
        if module.input_scale is not None:
            raise FormatError(f"{name} divides its input by smoothing scales that were not folded into the "
                              "op before it, and pack-quantized has no place for them; use a method or "
                              "architecture where the scales fold (see architectures.ScalePair)")
    if any(m.act_quantizer is not None for m in found.values()):
        log.warning("activation quantization is simulated in QuantLab only; the export holds the quantized "
                    "weights with full-precision activations (W%dA16)", next(iter(found.values())).fmt.n_bits)
    return found


def layer_tensors(name: str, module: QuantizedLinear) -> dict[str, torch.Tensor]:
    """One quantized linear as compressed-tensors stores it (codes exact; see the module docstring)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    fmt = module.fmt
    codes = module.codes.to(torch.int32)  # (out, in), stored column order
    scale = module.scale  # (rows, groups, 1)
    shift = 0 if fmt.symmetric else 2 ** (fmt.n_bits - 1)
    if module.in_perm is not None:
        codes = _unpermute(name, codes, module.in_perm, fmt)
    per_tensor = fmt.granularity.kind == "tensor"
    rows, groups = scale.shape[0], scale.shape[1]
    out = {
        f"{name}.weight_packed": pack_to_int32((codes - shift).to(torch.int8), fmt.n_bits),
        f"{name}.weight_scale": scale.reshape(1) if per_tensor else scale.reshape(rows, groups).contiguous(),
        f"{name}.weight_shape": torch.tensor(tuple(module.codes.shape), dtype=torch.int64),
    }
    if not fmt.symmetric:
        zero_point = (module.zero_point.reshape(rows, groups) - shift).to(torch.int8)  # (out, groups)
        out[f"{name}.weight_zero_point"] = (
            zero_point.reshape(1) if per_tensor  # stored unpacked, as the library does for per-tensor
            else pack_to_int32(zero_point, fmt.n_bits, packed_dim=0)
        )
    if module.bias is not None:
        out[f"{name}.bias"] = module.bias.detach().contiguous()
    return out


def _unpermute(name: str, codes: torch.Tensor, in_perm: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Codes in input order; GPTQ act-order codes are stored permuted (column j is feature in_perm[j])."""
    position = torch.argsort(in_perm)  # (in,): stored column of each input feature
    if fmt.granularity.kind == "group":
        g = fmt.granularity.group_size
        if not torch.equal(position // g, torch.arange(len(position), device=position.device) // g):
            raise FormatError(f"{name}: act-order groups follow the permuted column order, which needs a g_idx "
                              "tensor that compressed-tensors no longer supports; quantize with GPTQ static "
                              "groups, per-channel, or without act-order to export")
    return codes[:, position]


def _full_precision_tensors(model: nn.Module, quantized: dict[str, QuantizedLinear]) -> dict[str, torch.Tensor]:
    """Every persistent tensor outside the quantized layers, tied ones once (as save_pretrained does)."""
    owned = tuple(f"{name}." for name in quantized)
    seen, kept = set(), {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if key.startswith(owned) or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        kept[key] = tensor.detach().contiguous()
    return kept


def _write_weights(model: nn.Module, quantized: dict[str, QuantizedLinear], folder: Path,
                   max_shard_size: int | str) -> list[str]:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    tensors = _full_precision_tensors(model, quantized)
    for name, module in quantized.items():
        tensors.update(block_layer_tensors(name, module) if module.fmt.is_block_scaled else layer_tensors(name, module))
    tensors = {k: v.cpu() for k, v in tensors.items()}
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: tensors[n] for n in names}, folder / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return list(split.filename_to_tensors)


def _write_config(model: nn.Module, config, folder: Path, fmts: list[QuantFormat]) -> None:
    from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor

    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(folder)
    ModelCompressor(quantization_config=config).update_config(str(folder))
    path = folder / "config.json"
    document = json.loads(path.read_text())
    description = range_description(fmts[0])
    if len(fmts) > 1:  # per group, in the order of config_groups
        description = {"weight_format": "mixed", "groups": {f"group_{i}": range_description(f) for i, f in enumerate(fmts)}}
    document["quantization_config"]["quantlab"] = description
    path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")


def range_description(fmt: QuantFormat) -> dict:
    """What ``quantization_config.quantlab`` records: the format, its integer range and its scale rule."""
    if fmt.is_block_scaled:  # minifloat elements: no integer range; the block scale rule is the format's own
        return {"weight_format": fmt.name, "symmetric_range": None, "codes": None,
                "scale": f"one {fmt.scale_dtype} scale per block", "scale_dtype": fmt.scale_dtype}
    if fmt.symmetric:
        rule = f"absmax / {fmt.symmetric_divisor:g}"
    else:
        rule = f"(max - min) / {fmt.qmax}, zero_point = round(-min / scale)"
    return {"weight_format": fmt.name, "symmetric_range": fmt.symmetric_range if fmt.symmetric else None,
            "codes": [fmt.qmin, fmt.qmax], "scale": rule, "scale_dtype": fmt.scale_dtype}


def read_compressed(folder: str | Path) -> dict[str, Quantized]:
    """A ``pack-quantized`` integer checkpoint's layers as QuantLab codes and scales, by linear name.

    Codes come back in QuantLab's convention (symmetric int8 as stored, asymmetric shifted back to
    [0, 2^b-1]), so an export made here gives back exactly the ``Quantized`` it was written from.
    Checkpoints of other tools (no ``quantlab`` key) are read as the full range they use.
    """
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())["quantization_config"]
        tensors = {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise FormatError(f"{folder}: not a compressed-tensors checkpoint ({exc})") from None
    layers = {}
    for key in (k for k in tensors if k.endswith(".weight_packed")):
        name = key.removesuffix(".weight_packed")
        scale = tensors[f"{name}.weight_scale"]
        fmt = _format_from_config(config, scale.dtype)
        shape = torch.Size(tensors[f"{name}.weight_shape"].tolist())
        codes = unpack_from_int32(tensors[key], fmt.n_bits, shape)  # int8 in [-2^(b-1), 2^(b-1)-1]
        scale = scale.reshape(shape[0] if scale.numel() > 1 else 1, -1, 1)  # (rows, groups, 1)
        zero_point = None
        if not fmt.symmetric:
            shift = 2 ** (fmt.n_bits - 1)
            codes = (codes.to(torch.int16) + shift).to(torch.uint8)
            stored = tensors[f"{name}.weight_zero_point"]
            signed = stored if stored.numel() == 1 else unpack_from_int32(stored, fmt.n_bits, torch.Size(scale.shape[:2]), packed_dim=0)
            zero_point = (signed.to(torch.int32) + shift).reshape(scale.shape)
        clip_ratio = torch.full(scale.shape, float("nan"))  # not stored: the range search's choice is unknown
        layers[name] = Quantized(codes, QParams(scale, zero_point, clip_ratio), fmt, torch.float32)
    if not layers:
        raise FormatError(f"{folder}: the checkpoint has no packed integer weights (*.weight_packed)")
    return layers


def _format_from_config(config: dict, scale_dtype: torch.dtype) -> QuantFormat:
    """The QuantFormat a compressed-tensors config group describes (one group, integer weights)."""
    groups = list(config.get("config_groups", {}).values())
    weights = groups[0].get("weights") if len(groups) == 1 else None
    if not weights or weights.get("type") != "int" or weights.get("actorder") == "group":
        raise FormatError("only one config group of integer weights without a g_idx can be read; "
                          "this checkpoint has " + (json.dumps(weights) if weights else f"{len(groups)} groups"))
    strategy, group_size = weights["strategy"], weights.get("group_size")
    granularity = Granularity("group", group_size) if strategy == "group" else Granularity(strategy)
    dtype_name = {v: k for k, v in SCALE_DTYPES.items()}.get(scale_dtype)
    if dtype_name is None:
        raise FormatError(f"scales stored as {scale_dtype} are not supported; use fp16, bf16 or fp32 scales")
    symmetric_range = (config.get("quantlab") or {}).get("symmetric_range") or "full"
    return QuantFormat(kind="int", n_bits=weights["num_bits"], symmetric=weights["symmetric"], granularity=granularity,
                       scale_dtype=dtype_name, symmetric_range=symmetric_range if weights["symmetric"] else "full")


# --- run data: per-layer results and calibration statistics, reopenable without recomputing ------

RUNS_FILE = "runs.json"
STATS_FILE = "calibration_stats.safetensors"
STATS_INFO_FILE = "calibration_stats.json"


@dataclass(frozen=True)
class RunData:
    """What ``load_run_data`` reopens."""

    record: object  # records.RunRecord: the runs with their per-layer results and searches
    stats: dict  # linear name -> inputstats.ActivationStats (absmax, mean |x|, p99, p999 per channel)


def export_run_data(runs, stats: dict | None, out_dir: str | Path) -> Path:
    """Write runs (a RunResult, several, or a RunRecord) and activation statistics to a new folder.

    ``runs.json`` is a run record (or a bare list of run results, which ``records.read_record``
    also opens); ``calibration_stats.safetensors`` holds each linear's per-channel tensors under
    ``NAME.absmax``, ``NAME.mean_abs``, ...; ``calibration_stats.json`` the non-tensor fields.
    """
    from safetensors.torch import save_file

    from quantlab.recipe import RunResult, jsonable
    from quantlab.runs.records import RunRecord

    out = Path(out_dir)
    check_output_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(runs, RunRecord):
        document = runs.to_dict()
    else:
        document = [r.to_dict() for r in ((runs,) if isinstance(runs, RunResult) else runs)]
    (out / RUNS_FILE).write_text(json.dumps(document, indent=1, allow_nan=False))
    tensors, info = {}, {}
    for layer, layer_stats in (stats or {}).items():
        fields = layer_stats if isinstance(layer_stats, dict) else vars(layer_stats)
        for field_name, value in fields.items():
            if isinstance(value, torch.Tensor):
                # Linears fed by one op (q/k/v) share their statistics' tensors; safetensors wants each once.
                tensors[f"{layer}.{field_name}"] = value.detach().cpu().clone()
            else:
                info.setdefault(layer, {})[field_name] = jsonable(value)
    if tensors:
        save_file(tensors, out / STATS_FILE, metadata={"format": "pt"})
    (out / STATS_INFO_FILE).write_text(json.dumps(info, indent=1, allow_nan=False))
    return out


def load_run_data(folder: str | Path) -> RunData:
    """Reopen what ``export_run_data`` wrote; a missing or damaged file is a DataError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from quantlab.errors import DataError
    from quantlab.calibrate.inputstats import ActivationStats
    from quantlab.runs.records import read_record

    folder = Path(folder)
    record = read_record(folder / RUNS_FILE)
    try:
        info = json.loads((folder / STATS_INFO_FILE).read_text())
        tensors = load_file(folder / STATS_FILE) if (folder / STATS_FILE).exists() else {}
    except (OSError, json.JSONDecodeError, SafetensorError) as exc:
        raise DataError(f"{folder}: calibration statistics cannot be read ({exc}); export the run again") from None
    by_layer: dict[str, dict] = {layer: dict(fields) for layer, fields in info.items()}
    for key, tensor in tensors.items():
        layer, _, field_name = key.rpartition(".")
        by_layer.setdefault(layer, {})[field_name] = tensor
    try:
        stats = {layer: ActivationStats(**fields) for layer, fields in by_layer.items()}
    except TypeError as exc:
        raise DataError(f"{folder}: calibration statistics have unexpected fields ({exc})") from None
    return RunData(record, stats)
