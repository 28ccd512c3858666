"""What a quantization run is asked to do, and what it returns: frozen, validated dataclasses.

A ``QuantConfig`` names a method (``fp``, ``rtn``, ``gptq``, ``awq``, ``smoothquant``), the weight
format, optional activation (``ActSpec``) and KV-cache (``KVSpec``) quantization, the calibration
set and each method's own parameters. Configurations also have short names, the ones the sweep
and the CLI take::

    >>> parse_config_name("gptq-int4-g128").name
    'gptq-int4-g128'
    >>> parse_config_name("w8a8-smoothquant").act.n_bits
    8

Grammar: ``[rot-|rot1-|rot4-][METHOD-]FORMAT[-aBITS[-static]][-kv-KVFORMAT[-per-head]]``, with ``METHOD`` rtn by
default, plus ``fp``, ``fp-kv-int8`` and the aliases in ``ALIASES``. ``rot-`` rotates as QuaRot does:
the residual stream (fused) and each down_proj's input (online Hadamard, its inverse fused into
down_proj); ``rot1-`` rotates the residual stream alone (SpinQuant's R1), nothing online; ``rot4-`` the
down_proj inputs alone (R4), the one rotation valid for a post-norm encoder (BERT, MiniLM).

A run returns a ``RunResult``: one ``LayerResult`` per quantized linear and a summary (bits per
weight, bytes, quality, and the searches of AWQ/SmoothQuant), all convertible to plain JSON.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields, replace

import torch

from quantlab.errors import FormatError
from quantlab.numerics.formats import Granularity, QuantFormat

METHODS = ("fp", "rtn", "gptq", "awq", "smoothquant")
CALIBRATED_METHODS = ("gptq", "awq", "smoothquant")
MIXED_METHODS = ("rtn", "gptq")  # the methods whose block processors take a format per linear
KV_FORMATS = ("int8", "int4", "fp8-e4m3")
# Parameter count from which a model gets the large calibration set of its device (below).
LARGE_MODEL_PARAMS = 50_000_000
GPU_LARGE_CALIB = (128, 2048)  # (windows, tokens each): the GPTQ paper's calibration set
CPU_LARGE_CALIB = (16, 512)  # 8,192 tokens: a 0.5B model's GPTQ in minutes on 2 cores (bench/bench_scale.py)


@dataclass(frozen=True)
class CalibConfig:
    """The calibration set: ``n_samples`` windows of ``seq_len`` tokens drawn with ``seed``."""

    n_samples: int = 32  # 32 x 256 tokens is plenty for the bundled 4M model's 256..768-wide layers
    seq_len: int = 256
    seed: int = 0  # which windows are drawn; the same seed gives the same set everywhere
    source: str = "train"  # "train" | "heldout" (bundled stdlib text), a .txt path, or "wikitext2"

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise FormatError(f"calibration needs at least one sample, got n_samples={self.n_samples}")
        if self.seq_len < 2:
            raise FormatError(f"calibration sequences need at least 2 tokens, got seq_len={self.seq_len}")
        if not self.source:
            raise FormatError("calibration source is empty; use train, heldout, a .txt file or wikitext2")

    @property
    def n_tokens(self) -> int:
        return self.n_samples * self.seq_len

    @classmethod
    def for_model(cls, model: torch.nn.Module, **overrides) -> CalibConfig:
        """Small defaults for small models; for large ones, sized to the device the model is on.

        On a GPU, 128 x 2048 (the GPTQ paper's choice); on a CPU, ``CPU_LARGE_CALIB`` (16 x 512), so
        that GPTQ on a 0.5B-1B model finishes in minutes on a few cores, not hours. The length is
        capped at the model's context (``max_position_embeddings``).
        """
        n_params = sum(p.numel() for p in model.parameters())
        on_gpu = next(model.parameters()).device.type not in ("cpu", "meta")  # meta: a skeleton, sized as CPU
        large = GPU_LARGE_CALIB if on_gpu else CPU_LARGE_CALIB
        n_samples, seq_len = large if n_params >= LARGE_MODEL_PARAMS else (cls.n_samples, cls.seq_len)
        context = getattr(getattr(model, "config", None), "max_position_embeddings", None) or seq_len
        defaults = {"n_samples": n_samples, "seq_len": min(seq_len, context)}
        return cls(**{**defaults, **overrides})


@dataclass(frozen=True)
class ActSpec:
    """Activation quantization of every quantized linear's input (implemented in quantlab.calibrate.activations)."""

    n_bits: int = 8
    mode: str = "dynamic"  # "dynamic": scales computed per call; "static": calibrated once
    observer: str = "minmax"  # static only: "minmax" | "percentile" | "mse"
    granularity: str = "per-token"  # "per-token" (dynamic only) | "per-tensor"

    def __post_init__(self) -> None:
        if not 2 <= self.n_bits <= 8:
            raise FormatError(f"activation bits must be between 2 and 8, got {self.n_bits}")
        if self.mode not in ("dynamic", "static"):
            raise FormatError(f"activation mode must be dynamic or static, got {self.mode!r}")
        if self.observer not in ("minmax", "percentile", "mse"):
            raise FormatError(f"activation observer must be minmax, percentile or mse, got {self.observer!r}")
        if self.granularity not in ("per-token", "per-tensor"):
            raise FormatError(f"activation granularity must be per-token or per-tensor, got {self.granularity!r}")
        if self.mode == "static" and self.granularity == "per-token":
            raise FormatError("static activation scales are per-tensor (one calibrated scale); use mode dynamic for per-token")

    @property
    def name(self) -> str:
        return f"a{self.n_bits}" + ("-static" if self.mode == "static" else "")


@dataclass(frozen=True)
class KVSpec:
    """KV-cache quantization, simulated inside attention (implemented in quantlab.algorithms.kvcache)."""

    fmt_name: str = "int8"  # "int8" | "int4" | "fp8-e4m3"
    granularity: str = "per-token"  # one scale per token (all heads) or per token and head

    def __post_init__(self) -> None:
        if self.fmt_name not in KV_FORMATS:
            raise FormatError(f"KV-cache format must be one of {KV_FORMATS}, got {self.fmt_name!r}")
        if self.granularity not in ("per-token", "per-head"):
            raise FormatError(f"KV-cache granularity must be per-token or per-head, got {self.granularity!r}")

    @property
    def name(self) -> str:
        short = "fp8" if self.fmt_name == "fp8-e4m3" else self.fmt_name
        return f"kv-{short}" + ("-per-head" if self.granularity == "per-head" else "")


@dataclass(frozen=True)
class GPTQParams:
    """GPTQ's knobs, named as in the reference implementation; defaults as llm-compressor's GPTQModifier.

    The default is *static* act-order (llm-compressor's ``actorder="static"``, alias ``"weight"``):
    columns are quantized by decreasing diag(H), with group scales taken from the original weights
    in their original column order, so the checkpoint needs no ``g_idx``. ``act_order=False,
    static_groups=False`` is the original paper's order (``--no-act-order``).
    """

    damp: float = 0.01  # added to H's diagonal as a fraction of its mean: keeps the Cholesky stable
    block_size: int = 128  # columns per lazy batch: the updates of later columns are deferred to one matmul
    act_order: bool = True  # desc_act: quantize columns by decreasing diag(H), most salient first
    static_groups: bool = True  # group scales from the original weights, before any GPTQ update

    @property
    def label(self) -> str:
        """How the run was made, for records and summaries: ``static act-order, damp 0.01, block 128``."""
        order = ("static act-order" if self.static_groups else "act-order") if self.act_order else "column order"
        groups = ", static groups" if self.static_groups and not self.act_order else ""
        return f"{order}{groups}, damp {self.damp:g}, block {self.block_size}"

    def __post_init__(self) -> None:
        if not 0 < self.damp <= 1:
            raise FormatError(f"GPTQ damp must be in (0, 1], got {self.damp}; 0.01 is the usual value")
        if self.block_size < 1:
            raise FormatError(f"GPTQ block size must be a positive number of columns, got {self.block_size}")


@dataclass(frozen=True)
class AWQParams:
    """AWQ's search grids (Lin et al.): alpha in [0, 1) on ``n_grid`` points, then weight clipping."""

    n_grid: int = 20  # alpha = i / n_grid for i in 0..n_grid-1
    clip_search: bool = True  # search per-group clipping ratios after scaling
    clip_grid: int = 20  # clipping ratios 1 - i / clip_grid ...
    max_shrink: float = 0.5  # ... down to 1 - max_shrink

    def __post_init__(self) -> None:
        if self.n_grid < 1 or self.clip_grid < 1:
            raise FormatError(f"AWQ grids need at least one point, got n_grid={self.n_grid}, clip_grid={self.clip_grid}")
        if not 0 <= self.max_shrink < 1:
            raise FormatError(f"AWQ max_shrink must be in [0, 1), got {self.max_shrink}")


@dataclass(frozen=True)
class QuantConfig:
    """One configuration to run. ``name`` defaults to the canonical short name."""

    name: str = ""
    method: str = "rtn"  # "fp" | "rtn" | "gptq" | "awq" | "smoothquant"
    weight_format: QuantFormat | None = None  # None only for "fp"
    act: ActSpec | None = None  # W?A8: quantize the inputs of quantized linears
    kv: KVSpec | None = None  # quantize keys and values inside attention
    calib: CalibConfig = field(default_factory=CalibConfig)
    gptq: GPTQParams = field(default_factory=GPTQParams)
    awq: AWQParams = field(default_factory=AWQParams)
    smooth_alpha: float = 0.5  # SmoothQuant migration strength: 0 keeps activations, 1 moves all to weights
    rotate: bool = False  # first fuse a randomized Hadamard rotation of the residual stream (algorithms.rotation)
    # rotate each down-projection's input online (its inverse fused into the weight): rot- is both, as QuaRot;
    # rot1- the residual alone (SpinQuant's R1), rot4- this alone (R4; the one valid for post-norm BERT)
    rotate_down: bool = False
    # Mixed precision: (linear name, format) pairs that replace ``weight_format`` for those linears
    # (a plan under a size budget, quantlab.analysis.plan). Sorted by name, so equal plans compare equal.
    layer_formats: tuple[tuple[str, QuantFormat], ...] = ()

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise FormatError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.method == "fp" and self.weight_format is not None:
            raise FormatError("method fp keeps full-precision weights; use method rtn to quantize them")
        if self.method != "fp" and self.weight_format is None:
            raise FormatError(f"method {self.method} needs a weight format, e.g. int4-g128")
        if self.act is not None and self.weight_format is None:
            raise FormatError("activation quantization needs a weight format (W8A8: --format int8 --act int8)")
        if self.method == "smoothquant" and self.act is None:
            raise FormatError("smoothquant smooths activations for quantization; add --act int8")
        if not 0 <= self.smooth_alpha <= 1:
            raise FormatError(f"SmoothQuant alpha must be in [0, 1], got {self.smooth_alpha}")
        if (self.rotate or self.rotate_down) and self.weight_format is None:
            raise FormatError("rotation prepares weights for quantization; give a weight format (rot-int4-g128)")
        self._check_layer_formats()
        if not self.name:
            object.__setattr__(self, "name", self.canonical_name)

    def _check_layer_formats(self) -> None:
        if not self.layer_formats:
            return
        if self.method not in MIXED_METHODS:
            raise FormatError(f"per-layer formats run with {' or '.join(MIXED_METHODS)}, not {self.method}")
        names = [name for name, _ in self.layer_formats]
        if len(set(names)) != len(names):
            raise FormatError("a linear is given two formats in layer_formats; give each linear one")
        object.__setattr__(self, "layer_formats", tuple(sorted(self.layer_formats, key=lambda pair: pair[0])))

    def format_for(self, linear_name: str) -> QuantFormat | None:
        """The weight format of linear ``linear_name`` (its full module path): its override, else ``weight_format``."""
        return dict(self.layer_formats).get(linear_name, self.weight_format)

    @property
    def canonical_name(self) -> str:
        rotation = [_ROT_NAMES[self.rotate, self.rotate_down]] if self.rotate or self.rotate_down else []
        if self.layer_formats:  # the formats and their counts: "rtn-mixed-int8x3-int4-g128x25"
            counts = {}
            for _, fmt in self.layer_formats:
                counts[fmt.name] = counts.get(fmt.name, 0) + 1
            return "-".join(rotation + [self.method, "mixed"] + [f"{name}x{n}" for name, n in counts.items()])
        parts = rotation + [self.method] + ([self.weight_format.name] if self.weight_format else [])
        parts += [spec.name for spec in (self.act, self.kv) if spec is not None]
        return "-".join(parts)

    @property
    def needs_calibration(self) -> bool:
        return self.method in CALIBRATED_METHODS or (self.act is not None and self.act.mode == "static")

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["weight_format"] = self.weight_format.name if self.weight_format else None
        out["weight_format_fields"] = _format_fields(self.weight_format)
        out["layer_formats"] = [[name, _format_fields(fmt)] for name, fmt in self.layer_formats]
        for key in ("act", "kv", "calib", "gptq", "awq"):
            value = getattr(self, key)
            out[key] = asdict(value) if value is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict) -> QuantConfig:
        """Inverse of ``to_dict`` (what a sweep file stores)."""
        fmt = _format_from_fields(data.get("weight_format_fields"))
        layer_formats = tuple((name, _format_from_fields(fields)) for name, fields in data.get("layer_formats") or ())
        nested = {"act": ActSpec, "kv": KVSpec, "calib": CalibConfig, "gptq": GPTQParams, "awq": AWQParams}
        kwargs = {key: kind(**data[key]) for key, kind in nested.items() if data.get(key) is not None}
        return cls(name=data.get("name", ""), method=data["method"], weight_format=fmt,
                   smooth_alpha=data.get("smooth_alpha", 0.5), rotate=data.get("rotate", False),
                   rotate_down=data.get("rotate_down", False), layer_formats=layer_formats, **kwargs)


def _format_fields(fmt: QuantFormat | None) -> dict | None:
    return asdict(fmt) if fmt is not None else None


def _format_from_fields(fmt_fields: dict | None) -> QuantFormat | None:
    if not fmt_fields:
        return None
    fmt_fields = dict(fmt_fields)
    return QuantFormat(granularity=Granularity(**fmt_fields.pop("granularity")), **fmt_fields)


# Names people type, mapped to the canonical grammar.
ALIASES = {
    "fp16": "fp", "fp32": "fp", "full": "fp",
    "w8a8": "rtn-int8-a8",
    "w4a8": "rtn-int4-g128-a8",
    "w8a8-smoothquant": "smoothquant-int8-a8", "w8a8-sq": "smoothquant-int8-a8", "sq-w8a8": "smoothquant-int8-a8",
    "kv-int8": "fp-kv-int8", "kv-int4": "fp-kv-int4", "kv-fp8": "fp-kv-fp8",
}
_KV_SUFFIX = re.compile(r"-?kv-(?P<fmt>int8|int4|fp8)(?P<head>-per-head)?$")
_ACT_SUFFIX = re.compile(r"-a(?P<bits>[0-9]{1,3})(?P<static>-static)?$")  # ASCII, bounded, as QuantFormat.parse
_ROT_PREFIX = re.compile(r"^(?P<kind>rot[14]?)-")
_ROT_NAMES = {(True, True): "rot", (True, False): "rot1", (False, True): "rot4"}  # (residual, down) -> prefix
_METHOD_PREFIX = re.compile(r"^(?P<method>fp|rtn|gptq|awq|smoothquant|sq)(-|$)")


def parse_config_name(text: str, **overrides) -> QuantConfig:
    """Read ``gptq-int4-g128``, ``int8``, ``awq-int4-g64-asym``, ``w8a8-smoothquant``, ``fp-kv-int8``...

    ``overrides`` (e.g. ``calib=CalibConfig(...)``) replace fields of the result.
    """
    original = text
    text = text.strip().lower()
    # rot-int4-g128, rot-gptq-int4-g128, rot-w4a8: residual + online down_proj; rot1- / rot4-: one of them
    rotation = _ROT_PREFIX.match(text)
    rotate, rotate_down = (False, False) if rotation is None else \
        next(kinds for kinds, prefix in _ROT_NAMES.items() if prefix == rotation["kind"])
    text = text[rotation.end():] if rotation else text
    text = ALIASES.get(text, text)
    kv = act = None
    if match := _KV_SUFFIX.search(text):
        fmt_name = "fp8-e4m3" if match["fmt"] == "fp8" else match["fmt"]
        kv = KVSpec(fmt_name, "per-head" if match["head"] else "per-token")
        text = text[: match.start()]
    if match := _ACT_SUFFIX.search(text):
        static = bool(match["static"])
        act = ActSpec(int(match["bits"]), "static" if static else "dynamic", granularity="per-tensor" if static else "per-token")
        text = text[: match.start()]
    method = "rtn"
    if match := _METHOD_PREFIX.match(text):
        method = {"sq": "smoothquant"}.get(match["method"], match["method"])
        text = text[match.end():]
    try:
        fmt = QuantFormat.parse(text) if text else None
    except FormatError as exc:
        raise FormatError(f"cannot read configuration {original!r}: {exc}") from None
    config = QuantConfig(method=method, weight_format=fmt, act=act, kv=kv, rotate=rotate, rotate_down=rotate_down)
    return replace(config, **overrides) if overrides else config


@dataclass(frozen=True)
class LayerResult:
    """How one linear layer was quantized, measured on its calibration inputs X (rows = tokens)."""

    name: str  # full module path, e.g. "model.layers.0.mlp.down_proj"
    block: int
    role: str  # q, k, v, o, gate, up, down, qkv, ...
    method: str
    output_error: float  # ||XW^T - XŴ^T||^2 / ||XW^T||^2 over the calibration tokens
    weight_error: float  # ||W - Ŵ||^2 / ||W||^2
    clipped_fraction: float  # share of weights clamped to the grid's ends
    seconds: float
    extra: dict = field(default_factory=dict)  # method-specific: GPTQ loss, damping, fallback, AWQ alpha...

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["extra"] = jsonable(self.extra)
        return out


# A relative weight error this close to 1 means the quantized layer is (almost) all zeros: with
# denormal weights, for one, the scale underflows in its storage dtype.
ZEROED_LAYER_ERROR = 0.999


@dataclass(frozen=True)
class RunResult:
    """A whole run: per-layer results and the summary the sweep records."""

    config: QuantConfig
    layers: tuple[LayerResult, ...]
    bits_per_weight: float  # over the quantized linears, scales and zero-points included
    total_bytes: int  # the whole model as stored: quantized linears packed, the rest as is
    seconds: float  # quantization wall time (calibration-set building and evaluation excluded)
    quality: dict = field(default_factory=dict)  # perplexity / fidelity, kl, top1_agreement, ...
    searches: dict = field(default_factory=dict)  # AWQ/SmoothQuant search data, by layer or block
    calibration_seconds: float = 0.0  # building the calibration set: once per set, shared by the runs that use it
    source_warnings: tuple[str, ...] = ()  # about the model it started from (e.g. a pre-quantized checkpoint)

    @property
    def warnings(self) -> tuple[str, ...]:
        """What a user must know about the run: its source, and layers whose every weight rounded to zero."""
        return self.source_warnings + tuple(
            f"every weight of {layer.name} rounded to 0 (relative error {layer.weight_error:.2f}): its values "
            "are below the smallest scale the format can store"
            for layer in self.layers if layer.weight_error >= ZEROED_LAYER_ERROR
        )

    def to_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "name": self.config.name,
            "bits_per_weight": self.bits_per_weight,
            "total_bytes": self.total_bytes,
            "seconds": self.seconds,
            "calibration_seconds": self.calibration_seconds,
            "quality": jsonable(self.quality),
            "layers": [layer.to_dict() for layer in self.layers],
            "searches": jsonable(self.searches),
            "source_warnings": list(self.source_warnings),
        }

    @classmethod
    def from_dict(cls, data: dict) -> RunResult:
        return cls(
            config=QuantConfig.from_dict(dict(data["config"])),
            layers=tuple(LayerResult(**layer) for layer in data.get("layers", [])),
            bits_per_weight=data["bits_per_weight"], total_bytes=data["total_bytes"], seconds=data["seconds"],
            quality=data.get("quality", {}), searches=data.get("searches", {}),
            calibration_seconds=data.get("calibration_seconds", 0.0),
            source_warnings=tuple(data.get("source_warnings", ())),
        )


def jsonable(value):
    """Tensors to lists, NaN/Inf to None, nested dicts/lists/tuples converted: ready for json.dumps."""
    if isinstance(value, torch.Tensor):
        return jsonable(value.detach().cpu().tolist())
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
