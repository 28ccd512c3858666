"""Evaluation: perplexity for causal LMs, embedding fidelity for encoders, and an lm-eval bridge.

One entry for algorithms, sweeps, the CLI and the app::

    reference = build_reference(fp.model, fp.tokenizer, fp.kind, text)        # once, full precision
    result = evaluate(q.model, q.tokenizer, q.kind, text, reference=reference)  # per quantized copy
    result.metric, result.value, result.definitions()

For a causal LM the result is a :class:`PerplexityResult` (with KL and top-1 agreement when a
reference is given); for an encoder a :class:`FidelityResult`.
"""

from __future__ import annotations

from quantlab.errors import FormatError
from quantlab.evaluation.config import EvalConfig, model_context_length
from quantlab.evaluation.divergence import DivergenceResult, ReferenceLogProbs
from quantlab.evaluation.fidelity import FidelityResult, embed, embedding_fidelity
from quantlab.evaluation.lm_eval_bridge import (
    DEFAULT_TASKS, LmEvalRolling, lm_eval_rolling, matching_config, run_lm_eval_tasks,
)
from quantlab.evaluation.perplexity import PerplexityResult, compare_logits, perplexity, reference_logprobs
from quantlab.evaluation.scoring import count_words, plan_windows
from quantlab.texts.sources import SOURCES, decode_text, load_text, sentences

__all__ = [
    "DEFAULT_TASKS", "SOURCES", "DivergenceResult", "EvalConfig", "FidelityResult", "LmEvalRolling",
    "PerplexityResult", "ReferenceLogProbs", "build_reference", "compare_logits", "count_words", "decode_text",
    "embed", "embedding_fidelity", "evaluate", "lm_eval_rolling", "load_text", "matching_config",
    "model_context_length", "perplexity", "plan_windows", "reference_logprobs", "run_lm_eval_tasks", "sentences",
]


def _check_kind(kind: str) -> None:
    if kind not in ("causal", "encoder"):
        raise FormatError(f"model kind must be 'causal' or 'encoder', got {kind!r}")


def build_reference(model, tokenizer, kind: str, text: str | None = None, config: EvalConfig | None = None):
    """What a full-precision model contributes to later comparisons: top-k log-probs or embeddings."""
    _check_kind(kind)
    config = config or EvalConfig()
    text = text if text is not None else load_text("heldout")
    if kind == "causal":
        return reference_logprobs(model, tokenizer, text, config)
    return embed(model, tokenizer, sentences(text, config.n_sentences), max_tokens=config.max_sentence_tokens)


def evaluate(model, tokenizer, kind: str, text: str | None = None, config: EvalConfig | None = None,
             reference=None) -> PerplexityResult | FidelityResult:
    """Perplexity (causal) or fidelity (encoder) of ``model`` on ``text`` (default: the held-out text).

    ``reference`` comes from :func:`build_reference` on the full-precision model. For an encoder it
    may also be the full-precision model itself; without one the model is its own reference, which
    gives fidelity 1 by definition (the full-precision row of a sweep).
    """
    _check_kind(kind)
    config = config or EvalConfig()
    text = text if text is not None else load_text("heldout")
    if kind == "causal":
        return perplexity(model, tokenizer, text, config, reference)
    chosen = sentences(text, config.n_sentences)
    reference = model if reference is None else reference
    return embedding_fidelity(model, tokenizer, chosen, reference, max_tokens=config.max_sentence_tokens,
                              dtype=config.dtype)
