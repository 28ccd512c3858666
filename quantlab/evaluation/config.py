"""Evaluation settings, one frozen dataclass shared by perplexity, divergence and fidelity."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from quantlab.errors import FormatError

DTYPES = ("float32", "bfloat16")
MAX_DEFAULT_CTX = 2048  # GPTQ's and most papers' context; longer model contexts are opt-in
LOGITS_BUDGET_BYTES = 512 * 2**20  # fp32 log-probs of one batch; keeps 150k-vocab models at batch 1-2
MAX_AUTO_BATCH = 32
_CONTEXT_ATTRS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate. ``None`` fields are filled from the model by :meth:`resolved`."""

    ctx: int | None = None  # tokens per window, incl. the last target; None: model's context, <= 2048 (GPTQ)
    stride: int | None = None  # tokens between window starts; None: ctx, non-overlapping windows (GPTQ)
    max_tokens: int | None = None  # cap on the text's tokens, for quick looks; None: the whole text
    batch_size: int | None = None  # windows per forward pass; None: what fits LOGITS_BUDGET_BYTES
    dtype: str | None = None  # None: as loaded; "bfloat16": fp32 weights run under bf16 autocast
    prepend_bos: bool = False  # score the text's first token too, given BOS (lm-eval's rolling windows do)
    top_k: int = 256  # cached reference log-probs per position (8 bytes each) for KL; exact when >= vocabulary
    n_sentences: int = 128  # sentences for encoder fidelity
    max_sentence_tokens: int = 128  # longer sentences are truncated before embedding

    def __post_init__(self) -> None:
        for name in ("ctx", "stride", "max_tokens", "batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise FormatError(f"{name} must be a positive whole number or None, got {value!r}")
        if self.ctx is not None and self.ctx < 2:
            raise FormatError("ctx must be at least 2: a window needs one token of context and one to predict")
        if self.ctx is not None and self.stride is not None and self.stride > self.ctx:
            raise FormatError(f"stride {self.stride} is larger than ctx {self.ctx}, which would skip tokens; "
                              f"use a stride of at most {self.ctx}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise FormatError(f"dtype must be one of {', '.join(DTYPES)} (or None for the model's own), "
                              f"got {self.dtype!r}")
        for name in ("top_k", "n_sentences", "max_sentence_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise FormatError(f"{name} must be a positive whole number, got {getattr(self, name)!r}")

    def resolved(self, model) -> EvalConfig:
        """A copy with ctx, stride and batch_size filled in for ``model``, checked against its context."""
        limit = model_context_length(model)
        ctx = self.ctx if self.ctx is not None else min(limit or MAX_DEFAULT_CTX, MAX_DEFAULT_CTX)
        # The model sees ctx - 1 tokens of a window: its last token is only ever a target.
        if limit is not None and ctx - 1 > limit:
            raise FormatError(f"ctx {ctx} is longer than the model's {limit} positions allow; "
                              f"use --ctx {limit + 1} or less")
        stride = self.stride if self.stride is not None else ctx
        if stride > ctx:
            raise FormatError(f"stride {stride} is larger than ctx {ctx}; use a stride of at most {ctx}")
        vocab = getattr(model.config, "vocab_size", None) or 50_000
        batch_size = self.batch_size or max(1, min(MAX_AUTO_BATCH, LOGITS_BUDGET_BYTES // (ctx * vocab * 4)))
        return dataclasses.replace(self, ctx=ctx, stride=stride, batch_size=batch_size)


def model_context_length(model) -> int | None:
    """The longest input the model's config allows, or None when the config does not say."""
    config = getattr(model, "config", None)
    for attr in _CONTEXT_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
