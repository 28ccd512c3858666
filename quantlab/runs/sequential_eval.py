"""Perplexity of a model larger than memory: every evaluation window goes through one block at a time.

``quantlab eval FOLDER --sequential`` for a checkpoint that does not fit (a Llama-3-8B export
dequantizes to 16 GB in bf16): the windows of ``perplexity`` are embedded once, then each block is
read from the memory maps (``models.lazy.load_block``; a pre-quantized one dequantized from its
stored codes), run on every batch of windows and dropped; the final norm runs through the model's
own forward, and the output head scores the hidden states in chunks as in memory. The numbers are
those of the in-memory evaluation (the same windows, blocks and head: equal to fp32 rounding,
``tests/test_sequential_eval.py``).

Peak memory ≈ R + the tensors outside the blocks (embeddings, head) + one block in the load dtype
+ the hidden states of every window, twice (tokens x hidden x dtype bytes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from quantlab.calibrate.runner import BlockInputs, capture_block_inputs
from quantlab.device import trim_c_heap
from quantlab.evaluation.config import EvalConfig
from quantlab.evaluation.perplexity import PerplexityResult, perplexity_of_states, prepare_windows
from quantlab.evaluation.scoring import compute_context, window_batches
from quantlab.models.lazy import LazyModel, load_block, load_head
from quantlab.models.quantized import build_quantized_model
from quantlab.runs.sequential import rss_bytes

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class EvalBlockReport:
    """One block of a sequential evaluation: for the per-block progress lines."""

    index: int
    n_blocks: int
    seconds: float
    rss: int
    peak_rss: int

    def describe(self) -> str:
        return (f"block {self.index + 1} of {self.n_blocks}: {self.seconds:.1f} s, RSS {self.rss / 2**30:.2f} GiB "
                f"(peak {self.peak_rss / 2**30:.2f} GiB)")


class _StandIn(nn.Module):
    """A block's stand-in in a view of the model: block 0 hands back the final blocks' output of the
    batch, the others pass their input through, so the model's own forward applies what follows
    the blocks (the final norm) without any block running."""

    def __init__(self, original: nn.Module, as_tuple: bool, output: list[torch.Tensor] | None) -> None:
        super().__init__()
        self.original = original
        self.as_tuple = as_tuple
        self.output = output  # one tensor for block 0, set before each batch; None: pass through

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = self.output[0] if self.output is not None else hidden_states
        return (out,) if self.as_tuple else out

    def __getattr__(self, name: str):
        # Some models read attributes of their layers (e.g. Qwen's attention_type) before calling them.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["original"], name)


def _capture(lazy: LazyModel, batches: list[torch.Tensor]) -> BlockInputs:
    """The first block's inputs for each batch of windows (batches may differ in length)."""
    parts = [capture_block_inputs(lazy.model, ids, len(ids), lazy.structure) for ids in batches]
    return BlockInputs([h for p in parts for h in p.hidden], [a for p in parts for a in p.args],
                       [k for p in parts for k in p.kwargs])


def _through_block(block: nn.Module, inputs: BlockInputs, hidden: list[torch.Tensor],
                   context) -> tuple[list[torch.Tensor], bool]:
    outputs, as_tuple = [], False
    with torch.inference_mode(), context():
        for x, args, kwargs in zip(hidden, inputs.args, inputs.kwargs):
            out = block(x, *args, **kwargs)
            as_tuple = isinstance(out, tuple)
            outputs.append(out[0] if as_tuple else out)
    return outputs, as_tuple


def _after_blocks(lazy: LazyModel, batches: list[torch.Tensor], hidden: list[torch.Tensor],
                  as_tuple: bool, context) -> list[torch.Tensor]:
    """The base model's last hidden states: its forward on each batch with the blocks stood in for."""
    originals = list(lazy.structure.blocks(lazy.model))
    slot: list[torch.Tensor] = []
    stand_ins = [_StandIn(originals[0], as_tuple, slot)] + [_StandIn(b, as_tuple, None) for b in originals[1:]]
    view = build_quantized_model(lazy.model, stand_ins)
    states = []
    with torch.inference_mode(), context():
        for ids, h in zip(batches, hidden):
            slot[:] = [h]
            states.append(view.base_model(input_ids=ids.to(lazy.device), use_cache=False).last_hidden_state)
    return states


def perplexity_sequential(lazy: LazyModel, text: str, config: EvalConfig | None = None,
                          progress: Progress | None = None,
                          on_block: Callable[[EvalBlockReport], None] | None = None) -> PerplexityResult:
    """``perplexity`` of the lazily opened causal LM, one block in memory at a time."""
    prepared = prepare_windows(lazy.model, lazy.tokenizer, text, config)
    batches = [tokens[:, :-1] for _, tokens in window_batches(prepared.stream, prepared.windows,
                                                                prepared.config.batch_size)]
    # The in-memory evaluation's autocast (if any) around every block, as around its forward.
    context = lambda: compute_context(lazy.model, prepared.config.dtype)  # noqa: E731
    with context():
        inputs = _capture(lazy, batches)
    hidden, as_tuple = inputs.hidden, False
    n_blocks = lazy.structure.n_blocks
    for index in range(n_blocks):
        if progress is not None:
            progress(index / (n_blocks + 1), f"block {index + 1} of {n_blocks}")
        started = time.perf_counter()
        block = load_block(lazy, index)
        hidden, as_tuple = _through_block(block, inputs, hidden, context)
        del block
        trim_c_heap()  # the block's tensors go back to the system, not into a fragmented heap
        if on_block is not None:
            on_block(EvalBlockReport(index, n_blocks, time.perf_counter() - started, *rss_bytes()))
    if progress is not None:
        progress(n_blocks / (n_blocks + 1), "scoring")
    states = _after_blocks(lazy, batches, hidden, as_tuple, context)
    load_head(lazy)
    result = perplexity_of_states(lazy.model, prepared, states)
    if progress is not None:
        progress(1.0, "done")
    return result
