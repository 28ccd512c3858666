"""Evaluation through the LM head in chunks of tokens: same numbers, bounded memory at real vocab sizes.

The chunked path (base model's hidden states, then the head on at most ``chunk_tokens(V)``
positions at a time) is compared with the whole-window path (the model's own forward and its
(window, vocab) logits), which models with a transform after the head still take.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from quantlab.evaluation import EvalConfig, load_text, scoring
from quantlab.evaluation.perplexity import compare_logits, perplexity, reference_logprobs
from quantlab.recipe import parse_config_name
from quantlab.runs.pipeline import quantize_model

QWEN_VOCAB = 151_936  # Qwen2.5's real vocabulary


def scores(loaded, model_q, config: EvalConfig) -> list[float]:
    text = load_text("heldout")
    fp = perplexity(loaded.model, loaded.tokenizer, text, config)
    reference = reference_logprobs(loaded.model, loaded.tokenizer, text, config)
    cached = perplexity(model_q, loaded.tokenizer, text, config, reference=reference)
    exact = compare_logits(model_q, loaded.model, loaded.tokenizer, text, config)
    return [fp.perplexity, cached.perplexity, cached.divergence.kl_divergence, cached.divergence.top1_agreement,
            exact.kl_divergence, exact.top1_agreement, float(reference.values.double().sum())]


def test_chunked_scores_equal_whole_window_scores_on_the_bundled_lm(bundled_lm, monkeypatch):
    model_q, _ = quantize_model(bundled_lm, parse_config_name("int4-g64"), evaluate_quality=False)
    config = EvalConfig(max_tokens=4096)
    whole = None
    with monkeypatch.context() as patch:
        patch.setattr(scoring, "output_head", lambda model: None)  # the model's own forward, whole windows
        whole = scores(bundled_lm, model_q, config)
    monkeypatch.setattr(scoring, "LOGITS_CHUNK_BYTES", 4 * 4096 * 100)  # 100 tokens a chunk: several per window
    chunked = scores(bundled_lm, model_q, config)
    assert chunked == pytest.approx(whole, rel=1e-6)


def _qwen_real_vocab() -> torch.nn.Module:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=QWEN_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(config).eval()


def test_real_vocabulary_is_scored_in_bounded_chunks(bundled_lm, monkeypatch):
    model = _qwen_real_vocab()
    stream = scoring.encode_text(bundled_lm.tokenizer, load_text("heldout"), max_tokens=1024)
    config = EvalConfig(ctx=512).resolved(model)
    windows = scoring.plan_windows(len(stream.ids), config.ctx, config.stride)
    limit = scoring.chunk_tokens(QWEN_VOCAB)
    assert limit * QWEN_VOCAB * 4 <= scoring.LOGITS_CHUNK_BYTES < 512 * QWEN_VOCAB * 4
    chunked = list(scoring.score_windows(model, stream, windows, config))
    assert max(lp.shape[0] for lp, _ in chunked) <= limit  # never a (window, vocab) fp32 tensor
    monkeypatch.setattr(scoring, "output_head", lambda m: None)
    whole = list(scoring.score_windows(model, stream, windows, config))
    nll = [-sum(float(lp.gather(1, t[:, None]).double().sum()) for lp, t in run) for run in (chunked, whole)]
    assert nll[0] == pytest.approx(nll[1], rel=1e-6)
    assert sum(t.numel() for _, t in chunked) == sum(t.numel() for _, t in whole) == sum(w.n_scored for w in windows)


def test_a_head_with_a_logit_transform_scores_whole_windows():
    model = _qwen_real_vocab()
    assert scoring.output_head(model) is model.lm_head
    model.config.final_logit_softcapping = 30.0
    assert scoring.output_head(model) is None
