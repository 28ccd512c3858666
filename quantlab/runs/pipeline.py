"""Quantize a loaded model with a ``QuantConfig``, evaluate it, and run sweeps of configurations.

    >>> loaded = models.load_model()                                          # doctest: +SKIP
    >>> model_q, result = quantize_model(loaded, parse_config_name("gptq-int4-g128"))  # doctest: +SKIP
    >>> result.quality["perplexity"], result.bits_per_weight                  # doctest: +SKIP

Every method but ``fp`` goes through the block-sequential runner (:mod:`quantlab.calibrate.runner`),
even data-free RTN, so that every run reports the same per-layer output errors on the same kind
of inputs. The loaded model is never modified: the result shares its embeddings and head and
holds new quantized blocks. A ``QuantSession`` keeps what runs on one model share (calibration
tokens, the held-out text, the full-precision reference for KL or fidelity), so a sweep computes
them once.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from quantlab.recipe import CalibConfig, QuantConfig, RunResult, parse_config_name
from quantlab.models.architectures import ModelStructure, describe, weight_matrix
from quantlab.algorithms.rotation import rotate_model
from quantlab.calibrate import distributed
from quantlab.calibrate.runner import calibration_set, run_blocks
from quantlab.device import release_memory
from quantlab.errors import FormatError, QuantizationError
from quantlab.evaluation import EvalConfig, build_reference, evaluate, load_text, model_context_length
from quantlab.numerics.primitives import check_format_fits
from quantlab.models.memory import check_run_fits
from quantlab.models.sizing import model_size
from quantlab.runs.progress import BlockClock, RunPlan

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]

# The default sweep: full precision, RTN at four widths/granularities, the calibrated
# methods at INT4 g128, W8A8 with SmoothQuant, and an INT8 KV cache on full-precision weights.
DEFAULT_SWEEP = (
    "fp", "int8", "int4-g128", "int4-g64", "int4-per-channel", "int3-g128",
    "gptq-int4-g128", "awq-int4-g128", "w8a8-smoothquant", "kv-int8",
)
SWEEP_EVAL_TOKENS = 16_384  # held-out tokens per configuration in sweeps: keeps the default sweep under a minute
SWEEP_EVAL_CTX = 256  # the bundled LM's training context; long enough for stable perplexity differences
# Relative wall time of one configuration (calibration plus one evaluation) by method, from the
# shipped sweep of the bundled LM: the weights a distributed sweep balances its ranks with.
METHOD_COST = {"fp": 1.0, "rtn": 2.0, "smoothquant": 2.0, "gptq": 2.5, "awq": 3.0}
# Where each method's block processor lives; awq/smoothquant are imported only when used.
PROCESSORS = {
    "rtn": "quantlab.algorithms.rtn",
    "gptq": "quantlab.algorithms.gptq",
    "awq": "quantlab.algorithms.awq",
    "smoothquant": "quantlab.algorithms.smoothquant",
}


@dataclass
class QuantSession:
    """What every run on one loaded model shares: calibration tokens, eval text, the FP reference."""

    loaded: object  # models.LoadedModel
    eval_text: str | None = None  # None: the bundled held-out text
    eval_config: EvalConfig = field(default_factory=EvalConfig)
    _calibration: dict = field(default_factory=dict, repr=False)
    _reference: object = field(default=None, repr=False)

    def calibration_ids(self, calib: CalibConfig) -> torch.Tensor:
        if calib not in self._calibration:
            self._calibration[calib] = calibration_set(self.loaded.tokenizer, calib)
        return self._calibration[calib]

    @property
    def text(self) -> str:
        if self.eval_text is None:
            self.eval_text = load_text("heldout")
        return self.eval_text

    def reference(self):
        """The full-precision model's top-k log-probs (causal) or embeddings (encoder), built once."""
        if self._reference is None:
            loaded = self.loaded
            self._reference = build_reference(loaded.model, loaded.tokenizer, loaded.kind, self.text, self.eval_config)
        return self._reference

    def quality(self, model: nn.Module) -> dict:
        """Perplexity with KL/top-1 against full precision, or encoder fidelity, as a flat dict."""
        if self.loaded.tokenizer is None:
            return {}
        if model is self.loaded.model and self.loaded.kind == "causal":
            # The full-precision row: the reference pass already scored it, and it is its own reference.
            return self.reference().result.to_dict() | {"kl_divergence": 0.0, "top1_agreement": 1.0}
        result = evaluate(model, self.loaded.tokenizer, self.loaded.kind, self.text, self.eval_config, self.reference())
        return result.to_dict()


def _processor(method: str) -> Callable:
    try:
        module = importlib.import_module(PROCESSORS[method])
    except ModuleNotFoundError as exc:
        raise FormatError(f"method {method} is not available in this installation ({exc}); use rtn or gptq") from None
    return module.process_block


def _size(model: nn.Module, config: QuantConfig, structure: ModelStructure) -> tuple[float, int]:
    """Bits per quantized weight and total bytes, as the model would be stored."""
    if config.weight_format is not None:
        size = model_size(model, config.weight_format, layer_formats=dict(config.layer_formats) or None)
        return size.bits_per_weight, size.total_bytes
    linears = structure.linears
    dtype_bits = 8 * model.get_submodule(linears[0].name).weight.element_size() if linears else 32
    unique = {id(p): p for p in model.parameters()}.values()  # tied weights count once
    return float(dtype_bits), sum(p.numel() * p.element_size() for p in unique)


def _apply_kv(model: nn.Module, config: QuantConfig) -> nn.Module:
    if config.kv is None:
        return model
    from quantlab.algorithms.kvcache import kv_quantized_view

    return kv_quantized_view(model, config.kv)  # new module objects, shared weights


def plan_run(loaded, config: QuantConfig) -> RunPlan:
    """What ``quantize_model(loaded, config)`` will run: calibration tokens, blocks, linears, device."""
    device = next(loaded.model.parameters()).device.type
    return RunPlan(config.name, config.calib.n_samples, config.calib.seq_len, max(loaded.structure.n_blocks, 1),
                   len(loaded.structure.linears), device)


def check_config_fits(model: nn.Module, config: QuantConfig, structure: ModelStructure | None = None) -> None:
    """Fail before any work when ``config`` cannot run on ``model``.

    Calibration windows longer than the model's context, a weight format that cannot quantize one
    of its linears, and NaN or Inf weights (which have no code) are each reported by name.
    """
    context = model_context_length(model)
    if config.method != "fp" and context is not None and config.calib.seq_len > context:
        raise FormatError(f"{config.name}: calibration sequences of {config.calib.seq_len} tokens are longer than "
                          f"the model's context of {context} positions; use --calib-len {context} or less")
    if config.weight_format is None:
        return
    linears = (structure or describe(model)).linears
    unknown = sorted(set(dict(config.layer_formats)) - {info.name for info in linears})
    if unknown:
        raise FormatError(f"{config.name}: the plan names layers this model does not have ({', '.join(unknown[:3])}); "
                          "make the plan on this model")
    for info in linears:
        try:
            check_format_fits((info.out_features, info.in_features), config.format_for(info.name))
        except FormatError as exc:
            raise FormatError(f"{config.name}: {info.name} ({info.out_features}x{info.in_features}): {exc}") from None
        n_bad = (~torch.isfinite(weight_matrix(model.get_submodule(info.name)))).sum().item()
        if n_bad:
            raise QuantizationError(f"{info.name} has {n_bad} NaN or Inf weights, which no format can store; "
                                    "fix or replace the checkpoint before quantizing")


def quantize_model(loaded, config: QuantConfig, progress: Progress | None = None, eval_text: str | None = None,
                   max_eval_tokens: int | None = None, *, session: QuantSession | None = None,
                   evaluate_quality: bool = True) -> tuple[nn.Module, RunResult]:
    """Quantize ``loaded.model`` (never modified) per ``config``; evaluate unless told not to.

    ``max_eval_tokens`` caps the evaluation text; ``session`` shares calibration tokens and the
    full-precision reference between calls (``eval_text``/``max_eval_tokens`` are then the session's).
    """
    check_config_fits(loaded.model, config, loaded.structure)
    if config.weight_format is not None:  # the codes are held in memory: refuse what clearly cannot fit
        check_run_fits(loaded.name, loaded.structure.linears, next(loaded.model.parameters()).device)
    session = session or QuantSession(loaded, eval_text, EvalConfig(max_tokens=max_eval_tokens))
    report = progress or (lambda fraction, message: None)
    model, layers, searches, calib_seconds = loaded.model, (), {}, 0.0
    if config.method != "fp":
        log.info("%s", plan_run(loaded, config).describe())
        report(0.0, f"{config.name}: calibration set")
        start = time.perf_counter()
        calib_ids = session.calibration_ids(config.calib)  # built once per session and set: timed apart
        calib_seconds = time.perf_counter() - start
    start = time.perf_counter()
    # a rotated copy computes the same function; the shared model stays as it is
    rotated = config.rotate or config.rotate_down
    source = rotate_model(loaded.model, down_proj=config.rotate_down, residual=config.rotate) if rotated else loaded.model
    if config.method != "fp":
        clock = BlockClock(max(loaded.structure.n_blocks, 1))  # block 1 is the probe for the time left
        run = run_blocks(source, calib_ids, _processor(config.method), config, structure=loaded.structure,
                         progress=lambda f, m: report(0.8 * f, f"{config.name}: {m}{clock.note(f)}"))
        model, layers, searches = run.model, tuple(run.layers), run.searches
    model = _apply_kv(model, config)
    seconds = time.perf_counter() - start
    bits, total_bytes = _size(source, config, loaded.structure)  # rotation unties the head: it is counted
    quality = {}
    if evaluate_quality:
        report(0.8, f"{config.name}: evaluating")
        quality = session.quality(model)
    report(1.0, f"{config.name}: done")
    log.info("%s: %.1f s, %.2f bits/weight, quality %s", config.name, seconds, bits,
             {k: v for k, v in quality.items() if isinstance(v, float)})
    return model, RunResult(config, layers, bits, total_bytes, seconds, quality, searches, calib_seconds,
                            _source_warnings(loaded))


def _source_warnings(loaded) -> tuple[str, ...]:
    stored = getattr(loaded, "stored", None)
    if stored is None:
        return ()
    return (f"{loaded.name} is pre-quantized ({stored.description}): this run starts from its dequantized "
            "weights, so its error adds to the checkpoint's own",)


def sweep_configs(names: Sequence[str] | None = None, calib: CalibConfig | None = None) -> list[QuantConfig]:
    """Configurations from short names (default: ``DEFAULT_SWEEP``), all on the same calibration set."""
    overrides = {"calib": calib} if calib is not None else {}
    return [parse_config_name(name, **overrides) for name in (names or DEFAULT_SWEEP)]


def sweep_share(configs: Sequence[QuantConfig]) -> list[int]:
    """Indices of the configurations this rank runs: longest first, each to the least loaded rank."""
    owner = distributed.spread(list(range(len(configs))), lambda i: METHOD_COST.get(configs[i].method, 2.0))
    return [i for i in range(len(configs)) if owner[i] == distributed.rank()]


def run_sweep(loaded, configs: Sequence[QuantConfig] | None = None, progress: Progress | None = None,
              eval_text: str | None = None, max_eval_tokens: int | None = SWEEP_EVAL_TOKENS,
              ctx: int | None = None) -> list[RunResult]:
    """Run every configuration on ``loaded`` with shared calibration tokens and FP reference.

    Evaluation is capped at ``max_eval_tokens`` held-out tokens in windows of ``ctx`` tokens
    (default: ``SWEEP_EVAL_CTX`` or the model's context, whichever is shorter). Under torchrun each
    rank runs whole configurations on its own (``sweep_share``) and rank 0 gets every result, in
    the order of ``configs``; the other ranks get an empty list.
    """
    configs = list(configs) if configs is not None else sweep_configs()
    context = getattr(loaded.model.config, "max_position_embeddings", None) or SWEEP_EVAL_CTX
    eval_config = EvalConfig(ctx=ctx or min(SWEEP_EVAL_CTX, context), max_tokens=max_eval_tokens)
    session = QuantSession(loaded, eval_text, eval_config)
    report = progress or (lambda fraction, message: None)
    mine = sweep_share(configs)
    results = []
    with distributed.local_only():
        for done, index in enumerate(mine):
            config = configs[index]

            def step(fraction: float, message: str, done=done, index=index) -> None:
                report((done + fraction) / len(mine), f"[{index + 1}/{len(configs)}] {message}")

            _, result = quantize_model(loaded, config, step, session=session)
            results.append((index, result))
            release_memory()  # the quantized copy just went: keep a long session's memory flat
    return [result for _, result in sorted(distributed.gather_objects(results), key=lambda item: item[0])]
