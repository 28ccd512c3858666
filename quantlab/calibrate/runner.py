"""Calibration: the tokens a method looks at, and the block-sequential runner that feeds it.

- ``calibration_set`` draws ``n_samples`` windows of ``seq_len`` tokens from a text, seeded, so
  the same configuration always calibrates on the same tokens.
- ``run_blocks`` is the block-sequential runner (GPTQ's ``Catcher`` + per-block loop): it captures
  the inputs of the first block, then for each block deep-copies only that block, lets a
  ``process_block(ctx)`` function quantize the copy (hooks give it H, statistics and inputs, see
  :mod:`quantlab.calibrate.inputstats`), swaps its linears for ``QuantizedLinear`` and runs the quantized
  block to make the next block's inputs. Peak memory is one fp32 block, its activations and the
  int8 codes of the blocks done so far; the model passed in is never modified.
- ``collect_activation_stats`` runs the same loop without quantizing, for the outlier views.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from quantlab.calibrate import distributed
from quantlab.calibrate.activations import calibrated_quantizer
from quantlab.numerics.measures import output_error, output_error_from_inputs, weight_error
from quantlab.recipe import CalibConfig, LayerResult, QuantConfig
from quantlab.models.architectures import ArchSpec, LinearInfo, ModelStructure, describe, weight_matrix
from quantlab.errors import DataError, FormatError
from quantlab.device import trim_c_heap
from quantlab.texts.sources import load_text
from quantlab.texts.tokens import tokenize
from quantlab.calibrate.inputstats import ActivationStats, InputRecorder, LinearInputs
from quantlab.numerics.primitives import Quantized, dequantize
from quantlab.models.quantized import QuantizedLinear, build_quantized_model, set_submodule

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4  # generous for BPE on code or English: reading this many chars per token is enough text
SPAN_FACTOR = 8  # windows are drawn from a text this many times longer than they cover
MIN_TEXT_CHARS = 200_000
# Tokens per forward pass through a block. A block's transient activations (MLP intermediates,
# attention) scale with it and would dominate peak memory on small models; measured on the bundled
# LM, 512 tokens per pass is also twice as fast as 2048 on CPU (the operands stay in cache).
BATCH_TOKENS = 512


def calibration_text(cfg: CalibConfig) -> str:
    """Enough text of ``cfg.source`` to draw the windows from (a prefix, for the bundled corpus)."""
    budget = max(MIN_TEXT_CHARS, cfg.n_tokens * CHARS_PER_TOKEN * SPAN_FACTOR)
    return load_text(cfg.source, max_chars=budget)


def calibration_set(tokenizer, cfg: CalibConfig, text: str | None = None) -> torch.Tensor:
    """``(n_samples, seq_len)`` token ids: random windows of the tokenized text, seeded by ``cfg.seed``.

    As in GPTQ's data loader, each window starts at a uniformly drawn token position; windows may
    overlap. Encoders get their CLS/SEP tokens at the ends of each window.
    """
    if tokenizer is None:
        raise DataError("this model has no tokenizer, so no calibration text can be tokenized; load a model folder with one")
    text = text if text is not None else calibration_text(cfg)
    ids = torch.tensor(tokenize(tokenizer, text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    if ids.numel() <= cfg.seq_len:
        raise DataError(
            f"calibration text {cfg.source!r} has {ids.numel()} tokens, fewer than one window of {cfg.seq_len}; "
            "use a longer text or a smaller --calib-len"
        )
    generator = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randint(0, ids.numel() - cfg.seq_len + 1, (cfg.n_samples,), generator=generator)
    windows = torch.stack([ids[s : s + cfg.seq_len] for s in starts.tolist()])  # (N, L)
    cls_id, sep_id = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
    if cls_id is not None and sep_id is not None:
        windows[:, 0], windows[:, -1] = cls_id, sep_id
    return windows


# --- the block-sequential runner ------------------------------------------------------------------
class _StopForward(Exception):
    """Raised once the first block's inputs are recorded: the rest of the model need not run."""


class _Catcher(nn.Module):
    """Stands in for block 0 of a throw-away view of the model and records what it is called with."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.captured: list[tuple[torch.Tensor, tuple, dict]] = []

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        self.captured.append((hidden_states, args, kwargs))
        raise _StopForward

    def __getattr__(self, name: str):
        # Some models read attributes of their layers (e.g. Qwen's attention_type) before calling them.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)


@dataclass(frozen=True)
class BlockInputs:
    """What a block is called with, one entry per calibration batch."""

    hidden: list[torch.Tensor]  # (batch, seq, hidden) each
    args: list[tuple]  # other positional arguments (BERT passes its attention mask positionally)
    kwargs: list[dict]  # attention mask, position ids/embeddings, use_cache=False, ...

    @property
    def n_tokens(self) -> int:
        return sum(h[..., 0].numel() for h in self.hidden)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def default_batch_size(calib_ids: torch.Tensor) -> int:
    """Calibration windows per pass: ``BATCH_TOKENS`` tokens, at least one window."""
    return max(1, BATCH_TOKENS // calib_ids.shape[1])


def _blocks_of(model: nn.Module, structure: ModelStructure) -> nn.ModuleList:
    if structure.block_path is None:
        raise FormatError(f"no transformer blocks found in {type(model).__name__}; cannot quantize it block by block")
    return structure.blocks(model)


def capture_block_inputs(model: nn.Module, calib_ids: torch.Tensor, batch_size: int | None = None,
                         structure: ModelStructure | None = None) -> BlockInputs:
    """Run the embeddings on ``calib_ids`` and record the first block's inputs and keyword arguments.

    ``batch_size`` windows per pass (default: ``default_batch_size``) set the batches of the whole run;
    ``structure`` is ``model``'s (see ``LoadedModel.structure``), resolved here when not given.
    """
    blocks = _blocks_of(model, structure or describe(model))
    catcher = _Catcher(blocks[0])
    probe = build_quantized_model(model, [catcher, *blocks[1:]])  # a view: the model itself is untouched
    call_kwargs = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    batches = calib_ids.split(batch_size or default_batch_size(calib_ids))
    batches = [batches[i] for i in distributed.batch_share(len(batches))]  # all of them outside torchrun
    with torch.no_grad():
        for batch in (b.to(model_device(model)) for b in batches):
            try:
                probe(input_ids=batch, **call_kwargs)
            except _StopForward:
                continue
    if not catcher.captured:
        raise FormatError(f"{type(model).__name__} never called its first block; it cannot be calibrated block by block")
    hidden, args, kwargs = zip(*catcher.captured)
    return BlockInputs(list(hidden), list(args), list(kwargs))


@dataclass
class BlockContext:
    """One block's turn in the runner: what ``process_block(ctx) -> list[LayerResult]`` works with.

    ``block`` is a private deep copy of the model's block: a process function may change its
    weights (AWQ/SmoothQuant fold scales into norms) and calls ``finish_linear`` for every linear
    it quantizes; the runner then swaps those linears for ``QuantizedLinear`` and runs the block.
    """

    index: int
    prefix: str  # the block's path in the model, e.g. "model.layers.3"
    block: nn.Module
    inputs: BlockInputs
    spec: ArchSpec
    linears: dict[str, LinearInfo]  # by name inside the block, in block order
    config: QuantConfig | None
    searches: dict = field(default_factory=dict)  # search data (AWQ alphas, scales, losses) for the result
    replacements: dict[str, dict] = field(default_factory=dict)  # filled by finish_linear
    # Sequential runs (one process, models larger than memory) measure output errors from the kept
    # inputs X when that is cheaper; in-memory runs always use H, so 1 and N ranks report the same bits.
    errors_from_inputs: bool = False

    @property
    def needs_raw_inputs(self) -> bool:
        """Static activation scales are observed on the inputs themselves, so keep them."""
        act = self.config.act if self.config is not None else None
        return act is not None and act.mode == "static"

    def weight_format(self, local_name: str):
        """The format linear ``local_name`` is quantized to: the config's, or its per-layer override."""
        return self.config.format_for(self.linears[local_name].name)

    @property
    def keep_inputs(self) -> bool:
        """Keep the raw inputs: static activation scales need them, and with fewer calibration tokens
        than a linear has inputs its output error is cheaper from X than from H (see ``_output_error``)."""
        few_tokens = any(self.inputs.n_tokens < info.in_features for info in self.linears.values())
        return self.needs_raw_inputs or (few_tokens and self.errors_from_inputs)

    def linear_modules(self, block: nn.Module | None = None) -> dict[str, nn.Module]:
        block = block if block is not None else self.block
        return {name: block.get_submodule(name) for name in self.linears}

    def weight(self, local_name: str) -> torch.Tensor:
        """An fp32 copy of a linear's current weight as (out, in)."""
        return weight_matrix(self.block.get_submodule(local_name)).detach().float().clone()

    def run_block(self, block: nn.Module | None = None, hidden: list[torch.Tensor] | None = None,
                  after_batch: Callable[[], None] | None = None) -> list[torch.Tensor]:
        """The block's outputs on ``hidden`` (default: the calibration inputs), batch by batch."""
        block = block if block is not None else self.block
        hidden = hidden if hidden is not None else self.inputs.hidden
        outputs = []
        with torch.no_grad():
            for x, args, kwargs in zip(hidden, self.inputs.args, self.inputs.kwargs):
                out = block(x, *args, **kwargs)
                outputs.append(out[0] if isinstance(out, tuple) else out)
                if after_batch is not None:
                    after_batch()
        return outputs

    def collect(self, keep_inputs: bool = False, block: nn.Module | None = None,
                percentiles: bool = False) -> dict[str, LinearInputs]:
        """Run ``block`` (default: the working copy) on the inputs and return what each linear saw.

        ``keep_inputs`` keeps the raw inputs; ``percentiles`` adds p99/p99.9 to the statistics.
        """
        block = block if block is not None else self.block
        recorder = InputRecorder(self.linear_modules(block), self.inputs.n_tokens, keep_inputs, percentiles,
                                 n_batches=len(self.inputs.hidden))
        try:
            self.run_block(block, after_batch=recorder.next_batch)
        finally:
            inputs = recorder.finish()
        return inputs

    def finish_linear(self, local_name: str, quantized: Quantized, inputs: LinearInputs, *, seconds: float,
                      clipped_fraction: float, extra: dict | None = None, in_perm: torch.Tensor | None = None,
                      input_scale: torch.Tensor | None = None, act_quantizer=None,
                      effective_scale: torch.Tensor | None = None, reference_weight: torch.Tensor | None = None) -> LayerResult:
        """Record that ``local_name`` becomes ``quantized`` and measure it on the calibration inputs.

        Errors compare ``reference_weight`` (default: the working copy's current weight) on the
        inputs X that ``inputs.hessian`` was collected from with what the quantized layer computes
        on them: X / s times Ŵ, where s is ``effective_scale`` (scales folded upstream after H was
        collected) or else ``input_scale``. ``act_quantizer`` defaults to one built from
        ``config.act`` (static scales observed on ``inputs.inputs``).
        """
        module = self.block.get_submodule(local_name)
        W = reference_weight if reference_weight is not None else weight_matrix(module).detach().float()
        quantized = replace(quantized, dtype=weight_matrix(module).dtype)
        scale = effective_scale if effective_scale is not None else input_scale
        W_hat = effective_weight(quantized, in_perm, scale)  # (out, in) as applied to the original X
        if act_quantizer is None and self.config.act is not None:
            act_quantizer = calibrated_quantizer(self.config.act, inputs.inputs)
        self.replacements[local_name] = {"quantized": quantized, "input_scale": input_scale,
                                         "in_perm": in_perm, "act_quantizer": act_quantizer}
        info = self.linears[local_name]
        return LayerResult(
            name=info.name, block=self.index, role=info.role, method=self.config.method,
            output_error=_output_error(W, W_hat, inputs, self.errors_from_inputs), weight_error=weight_error(W, W_hat),
            clipped_fraction=clipped_fraction, seconds=seconds, extra=extra or {},
        )


def _output_error(W: torch.Tensor, W_hat: torch.Tensor, inputs: LinearInputs, from_inputs: bool) -> float:
    """From X when asked (sequential runs), kept, and with fewer tokens than inputs (out x tokens x in
    work, not out x in²); else from H. Under torchrun a rank keeps only its share of X, so in-memory
    runs always use H: the two forms agree to fp32 rounding, not bit for bit."""
    if from_inputs and inputs.inputs is not None and inputs.n_tokens < W.shape[1] and not distributed.is_distributed():
        return output_error_from_inputs(W, W_hat, inputs.inputs)
    return output_error(W, W_hat, inputs.hessian)


def effective_weight(quantized: Quantized, in_perm: torch.Tensor | None = None,
                     scale: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 (out, in) weight that multiplies the original inputs: unpermuted, divided by s."""
    W_hat = dequantize(quantized).float()
    if in_perm is not None:
        W_hat = W_hat[:, torch.argsort(in_perm)]
    return W_hat / scale.float() if scale is not None else W_hat


def convert_block(ctx: BlockContext) -> None:
    """Swap the linears ``process_block`` finished for ``QuantizedLinear`` in the working copy."""
    for local_name, parts in ctx.replacements.items():
        module = ctx.block.get_submodule(local_name)
        set_submodule(ctx.block, local_name, QuantizedLinear.from_linear(module, **parts))


@dataclass(frozen=True)
class BlockRun:
    """What ``run_blocks`` returns."""

    model: nn.Module | None  # the new model with the processed blocks; None when convert=False
    layers: list[LayerResult]
    searches: dict  # by block prefix: what each block's process function put in ctx.searches


def run_blocks(model: nn.Module, calib_ids: torch.Tensor | None, process_block: Callable[[BlockContext], list[LayerResult]],
               config: QuantConfig | None, *, convert: bool = True, batch_size: int | None = None,
               progress: Callable[[float, str], None] | None = None,
               block_inputs: BlockInputs | None = None, structure: ModelStructure | None = None) -> BlockRun:
    """Process ``model``'s blocks one at a time on private copies; ``model`` is never modified.

    ``block_inputs`` (from ``capture_block_inputs``) may be passed to reuse a capture across runs;
    ``structure`` is ``model``'s (see ``LoadedModel.structure``), resolved here when not given.
    """
    structure = structure or describe(model)
    blocks = _blocks_of(model, structure)
    inputs = block_inputs if block_inputs is not None else capture_block_inputs(model, calib_ids, batch_size, structure)
    new_blocks, layers, searches = [], [], {}
    for index, block in enumerate(blocks):
        if progress is not None:
            progress(index / len(blocks), f"block {index + 1} of {len(blocks)}")
        ctx = BlockContext(index, f"{structure.block_path}.{index}", copy.deepcopy(block), inputs, structure.spec,
                           structure.block_linears(index), config)
        layers.extend(process_block(ctx))
        if ctx.searches:
            searches[ctx.prefix] = ctx.searches
        if convert:
            convert_block(ctx)
            new_blocks.append(ctx.block)
        if index + 1 < len(blocks):
            inputs = replace(inputs, hidden=ctx.run_block())  # the processed block feeds the next one
        del ctx
        # A block's fp32 copies, Hessians and activations (tensors of 0.1-30 MB) are freed into glibc's
        # heap, which, fragmented, kept them mapped: RSS grew by ~100 MB a block on Qwen2.5-0.5B (peak
        # 4.4 GiB for a 0.9 GiB checkpoint; trimmed after each block 2.8 GiB, bench/bench_scale.py).
        trim_c_heap()
    if progress is not None:
        progress(1.0, "blocks done")
    return BlockRun(build_quantized_model(model, new_blocks) if convert else None, layers, searches)


def collect_activation_stats(model: nn.Module, calib_ids: torch.Tensor, batch_size: int | None = None,
                             progress: Callable[[float, str], None] | None = None,
                             structure: ModelStructure | None = None) -> dict[str, ActivationStats]:
    """Input statistics of every linear in the blocks of the full-precision ``model`` (not modified).

    Runs block by block on private copies, so memory stays at about one block plus activations.
    """
    stats: dict[str, ActivationStats] = {}

    def record(ctx: BlockContext) -> list[LayerResult]:
        for local_name, inputs in ctx.collect(percentiles=True).items():
            stats[ctx.linears[local_name].name] = inputs.stats
        return []

    run_blocks(model, calib_ids, record, config=None, convert=False, batch_size=batch_size, progress=progress,
               structure=structure)
    return stats
