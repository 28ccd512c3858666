"""Measured speed and memory of real low-bit kernels, next to full precision.

QuantLab's quality numbers come from simulated (fake) quantization; this module runs the kernels a
deployment would run and measures what they cost:

    CPU   fp32 | bf16 | int8-dynamic: int8 weights (per channel) and int8 activations (per tensor,
          scaled on the fly) through PyTorch's dynamic quantization of nn.Linear, i.e. real int8 GEMMs
          (fbgemm on x86, qnnpack on Arm).
    CUDA  bf16 | int4-weight-only (torchao's tinygemm kernel, groups of 128) | fp8 (torchao, dynamic
          per-row activations and weights; GPUs of compute capability 8.9 and up).

Only the linear layers inside the transformer blocks are converted, as QuantLab's size accounting
counts them: embeddings, norms and the LM head stay in the baseline dtype. Every variant is built
from a deep copy: the model passed in is never modified.

Latency per token: prefill is one forward pass over a prompt of ``prompt_tokens``, divided by its
length; decode (causal LMs) is ``decode_tokens`` greedy steps of one token each with the KV cache,
divided by their number. The median over ``repeats`` timed runs after one warm-up run is reported.
Memory: the resident-set growth (RSS, CPU) or allocated-memory growth (CUDA) while the variant is
built, after freeing what building it left behind; and, as a deterministic cross-check, the bytes
of the variant's weight tensors as stored (packed int8 weights included).

``torch.ao.quantization.quantize_dynamic`` is deprecated in favour of torchao but still present and
working in torch 2.13, and it is the only one of the two that runs int8 x int8 GEMMs on a CPU without
an extra package; its deprecation warnings are silenced where it is called.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import platform
import statistics
import time
import warnings
from dataclasses import asdict, dataclass

import psutil
import torch
from torch import nn

from quantlab.models.architectures import find_linears
from quantlab.device import release_memory, resolve_device
from quantlab.errors import FormatError
from quantlab.numerics.formats import QuantFormat
from quantlab.models.sizing import model_size

log = logging.getLogger(__name__)

CPU_VARIANTS = ("fp32", "bf16", "int8-dynamic")
CUDA_VARIANTS = ("bf16", "int4-weight-only", "fp8")
BASELINES = {"cpu": "fp32", "cuda": "bf16"}
INT4_GROUP_SIZE = 128  # tinygemm's groups; layers whose in_features it does not divide stay bf16
BACKENDS = {
    "fp32": "torch fp32 matmul",
    "bf16": "torch bf16 matmul",
    "int8-dynamic": "torch.ao dynamic quantization (int8 GEMM, {engine})",
    "int4-weight-only": "torchao Int4WeightOnlyConfig (tinygemm, g128)",
    "fp8": "torchao Float8DynamicActivationFloat8WeightConfig (per row)",
}


@dataclass(frozen=True)
class SpeedSettings:
    """How much work each measurement does."""

    prompt_tokens: int = 128  # prefill length; long enough that per-token cost dominates call overhead
    decode_tokens: int = 32  # greedy steps with the KV cache (causal LMs only)
    repeats: int = 3  # timed runs after one warm-up; the median is reported
    seed: int = 0  # the random prompt's token ids

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "decode_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise FormatError(f"{name.replace('_', ' ')} must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class SpeedResult:
    """One variant of one model, measured on one device."""

    model: str
    variant: str  # fp32 | bf16 | int8-dynamic | int4-weight-only | fp8
    backend: str  # which kernels ran
    device: str  # e.g. "cpu (x86_64, 2 threads, fbgemm)" or "cuda (NVIDIA H100 80GB HBM3)"
    prefill_ms_per_token: float
    decode_ms_per_token: float | None  # None for encoders, which do not decode
    resident_bytes: int  # measured memory growth while the variant was built (RSS or CUDA allocated)
    tensor_bytes: int  # bytes of the variant's weight tensors as stored (counted, not measured)
    prompt_tokens: int
    decode_tokens: int
    repeats: int
    label: str = "measured"  # as opposed to QuantLab's theoretical (computed) sizes

    def to_dict(self) -> dict:
        return asdict(self)


def variants_for(device: torch.device) -> tuple[str, ...]:
    return CUDA_VARIANTS if device.type == "cuda" else CPU_VARIANTS


def default_variants(device: torch.device) -> tuple[str, ...]:
    """The device's variants that can run here: torchao's need the package, FP8 a GPU of capability 8.9+."""
    if device.type != "cuda":
        return CPU_VARIANTS
    if importlib.util.find_spec("torchao") is None:
        log.warning("torchao is not installed: measuring bf16 only (pip install torchao for int4 and fp8)")
        return ("bf16",)
    return CUDA_VARIANTS if torch.cuda.get_device_capability(device) >= (8, 9) else ("bf16", "int4-weight-only")


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads, {torch.backends.quantized.engine})"


def measure_speed(model: nn.Module, kind: str, name: str, variants: tuple[str, ...] | None = None,
                  settings: SpeedSettings = SpeedSettings(), device=None) -> list[SpeedResult]:
    """Build each variant from a copy of ``model`` and measure it; ``model`` itself is left untouched.

    ``kind`` is "causal" (prefill and decode) or "encoder" (prefill only). ``variants`` defaults to
    the device's variants that can run here (``default_variants``); asking for one that cannot
    raises a FormatError that says why.
    """
    if kind not in ("causal", "encoder"):
        raise FormatError(f"model kind must be causal or encoder, got {kind!r}")
    target = resolve_device(None if device is None else str(device))
    variants = variants or default_variants(target)
    unknown = [v for v in variants if v not in variants_for(target)]
    if unknown:
        raise FormatError(f"variants {unknown} do not run on {target.type}; choose from {variants_for(target)}")
    _touch(model)  # page in lazily loaded (memory-mapped) weights now, so they do not count as growth
    ids = _prompt(model, settings)
    results = []
    for variant in variants:
        built, grown = _build_measured(model, variant, target)
        prefill, decode = _time_model(built, kind, ids.to(target), settings)
        results.append(SpeedResult(
            name, variant, BACKENDS[variant].format(engine=torch.backends.quantized.engine), device_label(target),
            prefill, decode if kind == "causal" else None, grown, weight_bytes(built),
            ids.shape[1], settings.decode_tokens if kind == "causal" else 0, settings.repeats,
        ))
        log.info("%s %s: prefill %.3f ms/token, memory %.1f MB", name, variant, prefill, grown / 2**20)
        del built
        release_memory(target)
    return results


def _touch(model: nn.Module) -> None:
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.sum()


def _prompt(model: nn.Module, settings: SpeedSettings) -> torch.Tensor:
    """Random token ids (seeded): latency does not depend on what the tokens say."""
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or settings.prompt_tokens + settings.decode_tokens
    length = min(settings.prompt_tokens, limit - settings.decode_tokens) if limit > settings.decode_tokens else limit
    generator = torch.Generator().manual_seed(settings.seed)
    return torch.randint(0, config.vocab_size, (1, max(1, length)), generator=generator)  # (1, prompt)


def _memory_now(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return psutil.Process().memory_info().rss


def _build_measured(model: nn.Module, variant: str, device: torch.device) -> tuple[nn.Module, int]:
    release_memory(device)
    before = _memory_now(device)
    built = build_variant(model, variant, device)
    release_memory(device)
    return built, max(0, _memory_now(device) - before)


def build_variant(model: nn.Module, variant: str, device: torch.device) -> nn.Module:
    """A converted deep copy of ``model`` on ``device``, in eval mode."""
    names = {info.name for info in find_linears(model)}
    if not names:
        raise FormatError("the model has no linear layers inside transformer blocks; nothing to convert")
    dtype = torch.float32 if variant in ("fp32", "int8-dynamic") else torch.bfloat16
    built = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    if variant == "int8-dynamic":
        return _int8_dynamic(built, names)
    if variant in ("int4-weight-only", "fp8"):
        return _torchao(built, variant, names, device)
    return built


def _int8_dynamic(model: nn.Module, names: set[str]) -> nn.Module:
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    # Per-channel weights, as QuantLab's INT8 default; a name-keyed spec leaves lm_head in fp32.
    spec = {name: per_channel_dynamic_qconfig for name in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices; see the module docstring
        return quantize_dynamic(model, spec, inplace=True)


def _torchao(model: nn.Module, variant: str, names: set[str], device: torch.device) -> nn.Module:
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig, Int4WeightOnlyConfig, PerRow, quantize_,
        )
    except ImportError:
        raise FormatError(f"{variant} needs torchao: pip install torchao") from None
    if variant == "fp8":
        if torch.cuda.get_device_capability(device) < (8, 9):
            raise FormatError(f"fp8 kernels need a GPU of compute capability 8.9 or newer, not {device_label(device)}")
        config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
        chosen = names
    else:
        config = Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE, int4_packing_format="tile_packed_to_4d")
        chosen = {n for n in names if model.get_submodule(n).in_features % INT4_GROUP_SIZE == 0}
    quantize_(model, config, filter_fn=lambda module, fqn: fqn in chosen)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's stored weights: parameters and buffers once each, packed int8 weights included."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += _tensor_bytes(tensor)
    for module in model.modules():
        packed = getattr(module, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):
            weight, bias = packed._weight_bias()
            total += _tensor_bytes(weight) + (_tensor_bytes(bias) if bias is not None else 0)
    return total


def _tensor_bytes(tensor: torch.Tensor) -> int:
    """Storage bytes; torchao's tensor subclasses report their inner packed tensors."""
    if hasattr(tensor, "__tensor_flatten__"):
        inner_names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, n)) for n in inner_names)
    if tensor.is_quantized:  # a packed int8 weight: codes plus its scales and zero points as stored
        side = (tensor.q_per_channel_scales(), tensor.q_per_channel_zero_points()) if tensor.qscheme() in (
            torch.per_channel_affine, torch.per_channel_symmetric) else ()
        return tensor.numel() * tensor.element_size() + sum(t.numel() * t.element_size() for t in side)
    return tensor.numel() * tensor.element_size()


def _time_model(model: nn.Module, kind: str, ids: torch.Tensor, settings: SpeedSettings) -> tuple[float, float]:
    """Median (prefill, decode) milliseconds per token over ``repeats`` runs after one warm-up."""
    runs = [_one_run(model, kind, ids, settings) for _ in range(settings.repeats + 1)][1:]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def _one_run(model: nn.Module, kind: str, ids: torch.Tensor, settings: SpeedSettings) -> tuple[float, float]:
    sync = torch.cuda.synchronize if ids.device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        sync()
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True) if kind == "causal" else model(input_ids=ids)
        sync()
        prefill = (time.perf_counter() - start) * 1e3 / ids.shape[1]
        if kind != "causal":
            return prefill, 0.0
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)  # (1, 1)
        start = time.perf_counter()
        for _ in range(settings.decode_tokens):
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync()
        return prefill, (time.perf_counter() - start) * 1e3 / settings.decode_tokens


# The QuantLab format closest to what each low-bit kernel stores, for the theoretical size beside it:
# torch.ao keeps fp32 scales per row, tinygemm bf16 scales and zeros per group of 128.
THEORETICAL_FORMATS = {
    "int8-dynamic": QuantFormat.parse("int8", scale_dtype="fp32"),
    "int4-weight-only": QuantFormat.parse(f"int4-g{INT4_GROUP_SIZE}-asym", scale_dtype="bf16"),
    "fp8": QuantFormat.parse("fp8-e4m3", scale_dtype="fp32"),
}
_FLOAT_WIDTHS = {"fp32": 4, "bf16": 2}


def theoretical_bytes(model: nn.Module, variant: str) -> int:
    """QuantLab's computed size of the variant (every float at the variant's width, or the closest format)."""
    fmt = THEORETICAL_FORMATS.get(variant)
    if fmt is not None:
        return model_size(model, fmt).total_bytes
    params = sum(layer.params for layer in model_size(model, THEORETICAL_FORMATS["int8-dynamic"]).layers)
    return params * _FLOAT_WIDTHS[variant]


def ratios(results: list[SpeedResult], baseline: str | None = None) -> dict[str, dict[str, float | None]]:
    """Each variant's latency and memory as a fraction of the baseline's (fp32 on CPU, bf16 on CUDA)."""
    if not results:
        return {}
    baseline = baseline or BASELINES["cuda" if results[0].device.startswith("cuda") else "cpu"]
    base = next((r for r in results if r.variant == baseline), None)
    if base is None:
        raise FormatError(f"no {baseline} result to compare with; measure it too")
    out = {}
    for r in results:
        both_decode = r.decode_ms_per_token and base.decode_ms_per_token
        decode = r.decode_ms_per_token / base.decode_ms_per_token if both_decode else None
        out[r.variant] = {
            "prefill": r.prefill_ms_per_token / base.prefill_ms_per_token,
            "decode": decode,
            "resident_memory": r.resident_bytes / base.resident_bytes if base.resident_bytes else None,
            "tensor_bytes": r.tensor_bytes / base.tensor_bytes,
        }
    return out
