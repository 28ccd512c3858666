"""The evaluator's inner loop: tokenize once, cut windows, run batches, yield log-probs of scored tokens.

Windows follow Hugging Face's sliding-window recipe over the joined, once-tokenized text: a window
of ``ctx`` tokens starts every ``stride`` tokens and scores only the tokens no earlier window
scored (at most ``ctx - 1``, since a window's first token has nothing to condition on). With
``stride == ctx`` these are GPTQ's non-overlapping windows. One difference from both: the last
window is aligned to the end of the text, so the tail keeps a full context (GPTQ drops the tail,
Hugging Face scores it from a short window) and every window has the same length, which batches
without padding. With ``max_tokens`` a multiple of ``ctx`` the result is GPTQ's to the token.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch

from quantlab.errors import DataError, FormatError, QuantizationError
from quantlab.evaluation.config import EvalConfig
from quantlab.texts.tokens import tokenize

log = logging.getLogger(__name__)

MIN_TOKENS = 16  # fewer tokens give a perplexity dominated by the first few predictions
PREFIX_CHARS_PER_TOKEN = 8  # first guess of text per token (English BPE: ~4); doubled when short
PREFIX_MARGIN_TOKENS = 64  # tokens past the last kept one, so the prefix's cut cannot change it


class Window(NamedTuple):
    begin: int  # first token of the window in the stream
    end: int  # one past its last token
    n_scored: int  # its last n_scored tokens are scored, each predicted from everything before it


@dataclass(frozen=True)
class TokenStream:
    """The text as one token sequence, and the part of the text those tokens cover."""

    ids: torch.Tensor  # (N,) int64 on the CPU, BOS first when prepend_bos
    text: str  # the text the scored tokens cover: all of it, or a prefix when max_tokens cut it
    prefix_tokens: int  # 1 when the stream starts with a BOS that is not text (prepend_bos), else 0


# Token streams already made, per tokenizer: a sweep scores the same held-out text once per
# configuration, and tokenizing its 180k tokens cost more than a second each time. Weak keys: a
# tokenizer that goes away takes its streams with it. A few texts per tokenizer at most.
_STREAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_STREAMS_PER_TOKENIZER = 4


def encode_text(tokenizer, text: str, max_tokens: int | None = None, prepend_bos: bool = False) -> TokenStream:
    """Tokenize ``text`` once, with the tokenizer's own special tokens (as GPTQ and lm-eval do).

    The same (tokenizer, text, max_tokens, prepend_bos) returns the stream made the first time.
    """
    if tokenizer is None:
        raise DataError("this model has no tokenizer, so it cannot be evaluated on text")
    try:
        cache = _STREAMS.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced: no reuse
        cache = {}
    key = (text, max_tokens, prepend_bos)  # str keys compare by value; their hash is computed once
    if key not in cache:
        if len(cache) >= _STREAMS_PER_TOKENIZER:
            cache.pop(next(iter(cache)))
        cache[key] = _encode(tokenizer, text, max_tokens, prepend_bos)
    return cache[key]


def _encode(tokenizer, text: str, max_tokens: int | None, prepend_bos: bool) -> TokenStream:
    fast = getattr(tokenizer, "is_fast", False)
    encoding = _encode_prefix(tokenizer, text, max_tokens, fast)
    ids = list(encoding["input_ids"])
    covered = text
    if max_tokens is not None and len(ids) > max_tokens:
        ids = ids[:max_tokens]
        # Offsets give the exact characters covered; slow tokenizers have none, so decode instead.
        covered = text[: encoding["offset_mapping"][max_tokens - 1][1]] if fast else tokenizer.decode(ids)
    prefix = 0
    if prepend_bos:
        bos = prefix_token_id(tokenizer)
        if not ids or ids[0] != bos:  # tokenizers that add BOS themselves get no second one
            ids = [bos, *ids]
        prefix = 1
    if len(ids) - prefix < MIN_TOKENS:
        raise DataError(f"the text has {len(ids) - prefix} tokens; evaluation needs at least {MIN_TOKENS}")
    return TokenStream(torch.tensor(ids, dtype=torch.long), covered, prefix)


def _encode_prefix(tokenizer, text: str, max_tokens: int | None, fast: bool):
    """The encoding of enough of ``text`` for ``max_tokens`` tokens: never the whole of a huge text.

    Tokenizing 64 MiB to keep 4,096 tokens cost 10 GiB. A prefix of ``PREFIX_CHARS_PER_TOKEN`` characters
    per wanted token is tried first and doubled until it gives ``max_tokens`` plus a margin, so that the
    tokens kept are those of the whole text (the cut falls well after the last one kept).
    """
    chars = len(text) if max_tokens is None else max_tokens * PREFIX_CHARS_PER_TOKEN
    while True:
        encoding = tokenize(tokenizer, text[:chars], return_offsets_mapping=fast, verbose=False)
        if chars >= len(text) or len(encoding["input_ids"]) >= max_tokens + PREFIX_MARGIN_TOKENS:
            return encoding
        chars *= 2


def prefix_token_id(tokenizer) -> int:
    """BOS, or EOS where there is no BOS: lm-eval's choice of the token that starts a document."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise FormatError("prepend_bos needs a BOS or EOS token, and this tokenizer has neither")
    return token


def plan_windows(n_tokens: int, ctx: int, stride: int) -> list[Window]:
    """Windows that together score every token once (stride < ctx) or all but window starts (stride == ctx)."""
    if not 1 <= stride <= ctx:
        raise FormatError(f"stride must be between 1 and ctx ({ctx}), got {stride}")
    length = min(ctx, n_tokens)
    windows: list[Window] = []
    scored_until = 1  # targets before this position are scored; position 0 has no context
    begin = 0
    while scored_until < n_tokens:
        end = min(begin + length, n_tokens)
        begin = end - length  # the tail window is right-aligned so that it keeps a full context
        windows.append(Window(begin, end, min(end - scored_until, length - 1)))
        scored_until = end
        begin += stride
    return windows


def count_words(text: str) -> int:
    """Words as lm-eval's wikitext task counts them: pieces of a split on runs of whitespace."""
    return len(re.split(r"\s+", text))


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def compute_context(model: torch.nn.Module, dtype: str | None):
    """Autocast for ``dtype="bfloat16"`` on fp32 weights; nothing when the model already runs in ``dtype``."""
    weights = next(model.parameters()).dtype
    if dtype is None or getattr(torch, dtype) == weights:
        return contextlib.nullcontext()
    if dtype == "float32":
        raise FormatError(f"the model's weights are {weights}; load it in float32 to evaluate in float32")
    return torch.autocast(model_device(model).type, dtype=torch.bfloat16)


def check_finite(model: torch.nn.Module, value: float, metric: str) -> float:
    """``value`` unchanged, or a QuantizationError naming the NaN/Inf weights that made it undefined."""
    if math.isfinite(value):
        return value
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    cause = f"NaN or Inf weights in {', '.join(bad[:3])}" if bad else "activations overflow (weights too large?)"
    raise QuantizationError(f"the model's outputs are NaN or Inf ({cause}), so its {metric} is undefined; "
                            "fix or replace the checkpoint")


def compute_dtype_name(model: torch.nn.Module, dtype: str | None) -> str:
    return dtype or str(next(model.parameters()).dtype).removeprefix("torch.")


# fp32 log-probs of one chunk of scored tokens: (chunk, vocab) x 4 bytes. 64 MB is ~110 tokens of a
# 151,936-token vocabulary, and a whole 256-token window of the bundled LM's 4,096.
LOGITS_CHUNK_BYTES = 64 * 2**20
# Config fields of heads that change the logits after the output projection; such models score
# through their own forward (whole-window logits) instead of the chunked head.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def output_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The LM head to apply to chunks of hidden states, or None when the model must score whole windows.

    None when the model has no separate base model and head, or its config names a transform of
    the logits after the head (soft-capping, scaling) that the chunked path would skip.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    base = getattr(model, "base_model", None)
    if head is None or base is None or base is model:
        return None
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    return head


def chunk_tokens(vocab_size: int) -> int:
    """Scored tokens per chunk: their fp32 log-probs fit ``LOGITS_CHUNK_BYTES``."""
    return max(1, LOGITS_CHUNK_BYTES // (4 * vocab_size))


def window_batches(stream: TokenStream, windows: list[Window], batch_size: int) -> Iterator[tuple[list[Window], torch.Tensor]]:
    """Consecutive windows, ``batch_size`` at a time, with their tokens (B, L) on the CPU."""
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        yield batch, torch.stack([stream.ids[w.begin : w.end] for w in batch])


def score_windows(model, stream: TokenStream, windows: list[Window], config: EvalConfig,
                  given_states: list[torch.Tensor] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per chunk of scored tokens: fp32 log-probs (n, V) and the tokens they predict (n,).

    Chunks come out in stream order, each at most ``chunk_tokens(V)`` positions, so a consumer can
    line them up with a cached reference, and two models scored on the same windows give chunks of
    the same sizes. The (window, vocab) logits are never materialised: the base model's hidden
    states of the scored positions go through the head one chunk at a time.

    ``given_states``: the base model's last hidden states of each batch (B, L-1, H), computed elsewhere
    (block by block, for a model larger than memory); then only the head of ``model`` runs.
    """
    device = model_device(model)
    head = output_head(model)
    for number, (batch, tokens) in enumerate(window_batches(stream, windows, config.batch_size)):
        tokens = tokens.to(device)  # (B, L)
        # The window's last token is only ever a target, so the model sees the first L - 1:
        # predictor p (0 <= p < L - 1) scores token p + 1, exactly as lm-eval feeds its windows.
        inputs, targets = tokens[:, :-1], tokens[:, 1:]  # (B, L-1) each
        with torch.inference_mode(), compute_context(model, config.dtype):
            if given_states is not None:
                states = given_states[number].to(device)
            elif head is None:
                states = model(input_ids=inputs, use_cache=False).logits  # (B, L-1, V)
            else:
                states = model.base_model(input_ids=inputs, use_cache=False).last_hidden_state  # (B, L-1, H)
        # A window's last n_scored tokens are predicted by positions p >= L - 1 - n_scored.
        first = torch.tensor([inputs.shape[1] - w.n_scored for w in batch], device=device)  # (B,)
        mask = torch.arange(inputs.shape[1], device=device)[None, :] >= first[:, None]  # (B, L-1)
        rows, picked = states[mask], targets[mask]  # (n, H or V), (n,)
        del states
        step = chunk_tokens(getattr(model.config, "vocab_size", None) or 50_000)
        for begin in range(0, rows.shape[0], step):
            part = rows[begin : begin + step]
            if head is not None:
                with torch.inference_mode(), compute_context(model, config.dtype):
                    part = head(part)  # (chunk, V)
            # fp32 log-softmax whatever the compute dtype: bf16 sums over a vocabulary lose ~3 digits.
            with torch.inference_mode():
                logprobs = torch.log_softmax(part.float(), dim=-1)  # (chunk, V)
            yield logprobs, picked[begin : begin + step]  # outside the contexts: the consumer runs in its own
