"""Token perplexity, word perplexity and bits per byte, each labelled with its definition.

    >>> result = perplexity(model, tokenizer, load_text("heldout"), EvalConfig(ctx=256))  # doctest: +SKIP
    >>> result.perplexity, result.definitions()["perplexity"]                           # doctest: +SKIP

- token perplexity: exp(mean NLL over the scored tokens), windows as in :mod:`.scoring`;
- word perplexity: exp(total NLL / words) and bits per byte: total NLL / (ln 2 x UTF-8 bytes), as
  lm-eval's wikitext task defines them, over the text the scored tokens cover;
- with a full-precision ``reference`` (:func:`reference_logprobs`), KL divergence and top-1
  agreement in the same pass (:mod:`.divergence`).

Evaluation runs where the model is (load it on CUDA to evaluate on CUDA) and never changes it.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, replace

import torch

from quantlab.errors import FormatError
from quantlab.evaluation.config import EvalConfig
from quantlab.evaluation.divergence import (
    DivergenceAccumulator, DivergenceResult, ReferenceLogProbs, TopKCollector, CachedBatches,
)
from quantlab.evaluation.uncertainty import ratio_mean
from quantlab.evaluation.scoring import (
    TokenStream, Window, check_finite, compute_dtype_name, count_words, encode_text, output_head, plan_windows,
    score_windows,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float  # exp(nll)
    nll: float  # mean negative log-likelihood per scored token, nats
    tokens: int  # scored tokens
    words: int  # whitespace-separated words of the covered text (lm-eval's count)
    bytes: int  # UTF-8 bytes of the covered text
    word_perplexity: float
    bits_per_byte: float
    ctx: int
    stride: int
    n_windows: int
    prepend_bos: bool
    dtype: str  # the compute dtype: float32, bfloat16, ...
    divergence: DivergenceResult | None = None  # against a full-precision reference, when one was given
    window_nll: tuple[float, ...] = ()  # NLL summed over each window's scored tokens: standard errors, pairing
    window_tokens: tuple[int, ...] = ()  # scored tokens of each window, in the same order

    metric = "perplexity"  # the headline metric, so sweeps can treat causal and encoder results alike

    @property
    def value(self) -> float:
        return self.perplexity

    @property
    def nll_se(self) -> float:
        """Standard error of the mean NLL over the windows (NaN with one window)."""
        return ratio_mean(self.window_nll, self.window_tokens).se if self.window_nll else math.nan

    @property
    def perplexity_se(self) -> float:
        return self.perplexity * self.nll_se  # delta method: d exp(m) = exp(m) dm

    @property
    def window_scheme(self) -> str:
        if self.stride == self.ctx:
            return f"non-overlapping windows of {self.ctx} tokens (GPTQ), first token of each window not scored"
        return (f"sliding windows of {self.ctx} tokens, stride {self.stride}: each window scores up to its last "
                f"{self.stride} tokens (Hugging Face)")

    def definitions(self) -> dict[str, str]:
        """What each number means, for labels and tooltips: users compare numbers across tools."""
        first = ", first text token scored after BOS" if self.prepend_bos else ""
        same = f"(lm-eval wikitext definition); ctx {self.ctx}, stride {self.stride}"
        definitions = {
            "perplexity": f"token perplexity = exp(mean NLL over {self.tokens:,} predicted tokens); "
                          f"{self.window_scheme}{first}; {self.dtype}",
            "word_perplexity": f"exp(total NLL / {self.words:,} whitespace-separated words) {same}",
            "bits_per_byte": f"total NLL / (ln 2 x {self.bytes:,} UTF-8 bytes) {same}",
        }
        return definitions | (self.divergence.definitions() if self.divergence else {})

    def to_dict(self) -> dict:
        fields = {name: getattr(self, name) for name in (
            "perplexity", "nll", "tokens", "words", "bytes", "word_perplexity", "bits_per_byte", "ctx", "stride",
            "n_windows", "prepend_bos", "dtype", "nll_se", "perplexity_se")}
        fields |= {"window_nll": list(self.window_nll), "window_tokens": list(self.window_tokens)}
        return fields | (self.divergence.to_dict() if self.divergence else {}) | {"definitions": self.definitions()}


class _NllSum:
    """Total NLL and the NLL of each window. Batches arrive as consecutive windows, concatenated, and
    may end inside a window (the LM head is scored in chunks of tokens), so a window's sum is carried over."""

    def __init__(self, windows: list[Window]):
        self.sizes = [w.n_scored for w in windows]
        self.per_window: list[float] = []  # Python floats (double): 10^5 token NLLs summed in fp32 lose digits
        self._partial = 0.0  # NLL so far of the window being filled
        self._filled = 0  # its tokens so far

    def update(self, logprobs, targets) -> None:
        token_nll = -logprobs.gather(1, targets[:, None]).double().squeeze(1)  # (n,)
        taken, n = 0, token_nll.numel()
        while taken < n:
            size = self.sizes[len(self.per_window)]
            take = min(size - self._filled, n - taken)
            self._partial += float(token_nll[taken : taken + take].sum())
            self._filled += take
            taken += take
            if self._filled == size:
                self.per_window.append(self._partial)
                self._partial, self._filled = 0.0, 0

    @property
    def total(self) -> float:
        return math.fsum(self.per_window)

    @property
    def count(self) -> int:
        return sum(self.sizes[: len(self.per_window)])


@dataclass(frozen=True)
class _Prepared:
    config: EvalConfig  # resolved for the model
    stream: TokenStream
    windows: list[Window]

    @property
    def fingerprint(self) -> tuple:
        """What a cached reference must share with a later pass for their positions to line up."""
        digest = hashlib.sha1(self.stream.ids.numpy().tobytes()).hexdigest()[:16]
        return self.config.ctx, self.config.stride, self.config.prepend_bos, len(self.stream.ids), digest


def _prepare(model, tokenizer, text: str, config: EvalConfig | None) -> _Prepared:
    config = (config or EvalConfig()).resolved(model)
    stream = encode_text(tokenizer, text, config.max_tokens, config.prepend_bos)
    return _Prepared(config, stream, plan_windows(len(stream.ids), config.ctx, config.stride))


def _run(model, prepared: _Prepared, extra_observers=(), given_states=None) -> PerplexityResult:
    """One pass over the windows; every observer sees every batch of log-probs."""
    config, stream = prepared.config, prepared.stream
    log.info("scoring %d tokens in %d windows of %d (stride %d), batch %d", len(stream.ids), len(prepared.windows),
             config.ctx, config.stride, config.batch_size)
    nll = _NllSum(prepared.windows)
    for logprobs, targets in score_windows(model, stream, prepared.windows, config, given_states):
        for observer in (nll, *extra_observers):
            observer.update(logprobs, targets)
    mean_nll = check_finite(model, nll.total / nll.count, "perplexity")
    words, n_bytes = count_words(stream.text), len(stream.text.encode("utf-8"))
    return PerplexityResult(
        perplexity=_exp(mean_nll), nll=mean_nll, tokens=nll.count, words=words, bytes=n_bytes,
        word_perplexity=_exp(nll.total / words), bits_per_byte=nll.total / (math.log(2) * n_bytes),
        ctx=config.ctx, stride=config.stride, n_windows=len(prepared.windows),
        prepend_bos=bool(stream.prefix_tokens), dtype=compute_dtype_name(model, config.dtype),
        window_nll=tuple(nll.per_window), window_tokens=tuple(nll.sizes[: len(nll.per_window)]),
    )


def prepare_windows(model, tokenizer, text: str, config: EvalConfig | None = None) -> _Prepared:
    """The tokens and windows ``perplexity`` would score: for a caller that computes the hidden
    states itself (block by block) and then calls ``perplexity_of_states``."""
    return _prepare(model, tokenizer, text, config)


def perplexity_of_states(model, prepared: _Prepared, states: list[torch.Tensor]) -> PerplexityResult:
    """``perplexity`` from the base model's last hidden states of each batch of ``prepared``'s
    windows (``scoring.window_batches`` order); only ``model``'s output head runs."""
    if output_head(model) is None:
        raise FormatError(f"{type(model).__name__} transforms its logits after the output head (or has no "
                          "separate head), so it cannot be scored from hidden states; evaluate it in memory")
    if len(states) != math.ceil(len(prepared.windows) / prepared.config.batch_size):
        raise ValueError(f"{len(states)} batches of hidden states for {len(prepared.windows)} windows "
                         f"in batches of {prepared.config.batch_size}")
    return _run(model, prepared, given_states=states)


def _exp(x: float) -> float:
    """exp, with inf past float range: a text of one 'word' 33 MiB long has a word perplexity past 1e308."""
    return math.exp(x) if x < 709.0 else math.inf


def perplexity(model, tokenizer, text: str, config: EvalConfig | None = None,
               reference: ReferenceLogProbs | torch.nn.Module | None = None) -> PerplexityResult:
    """Perplexity of a causal LM on ``text``; with a reference, KL and top-1 agreement in the same pass.

    ``reference`` is a cached :func:`reference_logprobs` (cheap per model: KL over its top-k tokens)
    or the full-precision model itself (exact full-vocabulary KL, at the cost of running both).
    """
    prepared = _prepare(model, tokenizer, text, config)
    if reference is None:
        return _run(model, prepared)
    if isinstance(reference, torch.nn.Module):
        paired = score_windows(reference, prepared.stream, prepared.windows, prepared.config)
        divergence = DivergenceAccumulator((logprobs, None) for logprobs, _ in paired)
    else:
        reference.check_matches(prepared.fingerprint)
        divergence = DivergenceAccumulator(CachedBatches(reference))
    return replace(_run(model, prepared, (divergence,)), divergence=divergence.result())


def reference_logprobs(model, tokenizer, text: str, config: EvalConfig | None = None) -> ReferenceLogProbs:
    """Score the full-precision model once, keeping its top-k log-probs for later KL comparisons.

    The returned reference carries the model's own PerplexityResult as ``.result``.
    """
    prepared = _prepare(model, tokenizer, text, config)
    collector = TopKCollector(prepared.config.top_k)
    result = _run(model, prepared, (collector,))
    return collector.reference(prepared.fingerprint, result)


def compare_logits(model_q, model_fp, tokenizer, text: str, config: EvalConfig | None = None) -> DivergenceResult:
    """Exact mean KL(P_fp || P_q) over the full vocabulary and top-1 agreement, on the same windows."""
    return perplexity(model_q, tokenizer, text, config, reference=model_fp).divergence
