"""QuantLab's perplexity against lm-eval's rolling log-likelihood: same model object, same text, offline.

lm-eval runs through a local task (no download) on the bundled LM; QuantLab uses the settings that
score the same tokens with the same context (``matching_config``). Word perplexity must agree
within 0.5% (the issue's bar); in practice they agree to float rounding.
"""

from __future__ import annotations

import pytest

from quantlab.errors import DataError
from quantlab.evaluation import EvalConfig, load_text, lm_eval_rolling, matching_config, perplexity, run_lm_eval_tasks
from quantlab.texts.sources import hub_unreachable_reason

MAX_LENGTH = 128


def test_word_perplexity_matches_lm_eval(bundled_lm):
    text = load_text("heldout", max_chars=8000)
    ours = perplexity(bundled_lm.model, bundled_lm.tokenizer, text, matching_config(MAX_LENGTH, batch_size=8))
    theirs = lm_eval_rolling(bundled_lm.model, bundled_lm.tokenizer, text, MAX_LENGTH, batch_size=8)
    assert ours.word_perplexity == pytest.approx(theirs.word_perplexity, rel=0.005)
    assert ours.bits_per_byte == pytest.approx(theirs.bits_per_byte, rel=0.005)
    assert ours.tokens == len(bundled_lm.tokenizer(text)["input_ids"])  # every text token scored, as lm-eval does


def test_gptq_windows_differ_from_lm_eval_only_by_unscored_window_starts(bundled_lm):
    """Non-overlapping windows skip each window's first token (the right-aligned tail window excepted)."""
    text = load_text("heldout", max_chars=8000)
    rolling = perplexity(bundled_lm.model, bundled_lm.tokenizer, text, matching_config(MAX_LENGTH))
    gptq = perplexity(bundled_lm.model, bundled_lm.tokenizer, text, EvalConfig(ctx=MAX_LENGTH))
    assert rolling.tokens - gptq.tokens in (gptq.n_windows - 1, gptq.n_windows)
    assert gptq.word_perplexity < rolling.word_perplexity


def test_standard_tasks_offline_are_a_data_error(bundled_lm):
    if hub_unreachable_reason() is None:
        pytest.skip("the Hugging Face hub is reachable here; this test is for offline machines")
    with pytest.raises(DataError, match="hub"):
        run_lm_eval_tasks(bundled_lm.model, bundled_lm.tokenizer, tasks=["arc_easy"], limit=4)
