"""Perplexity, KL/top-1, encoder fidelity, text sources and the eval command, on real (tiny or bundled) models.

References are written independently of the evaluator: GPTQ's evaluation loop and Hugging Face's
sliding-window loop, each calling the model with ``labels=``, and KL from ``F.kl_div``.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from quantlab.cli import main
from quantlab.errors import DataError, FormatError
from quantlab.evaluation import (
    EvalConfig, build_reference, compare_logits, count_words, decode_text, embed, embedding_fidelity, evaluate,
    load_text, perplexity, plan_windows, reference_logprobs, sentences,
)
from quantlab.texts.sources import hub_unreachable_reason

# The first 8,000 characters of WikiText-2 raw test, shipped with the tests (licence: tests/data/README.md).
WIKITEXT = Path(__file__).resolve().parent / "data" / "wikitext-2-raw-test-excerpt.txt"


@pytest.fixture(scope="module")
def tokenizer(bundled_lm):
    return bundled_lm.tokenizer


@pytest.fixture(scope="module")
def text() -> str:
    return load_text("heldout", max_chars=6000)


@pytest.fixture(scope="module")
def ids(tokenizer, text) -> torch.Tensor:
    return torch.tensor(tokenizer(text)["input_ids"])


def _perturbed(model: torch.nn.Module, scale: float) -> torch.nn.Module:
    noisy = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in noisy.model.layers.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.abs().mean())
    return noisy


# --- perplexity against independent loops ---------------------------------------------------------------

def gptq_perplexity(model, ids: torch.Tensor, ctx: int) -> float:
    """GPTQ's llama_eval: non-overlapping windows, loss * seqlen summed, divided by nsamples * seqlen."""
    n_samples = len(ids) // ctx
    nlls = []
    for i in range(n_samples):
        window = ids[i * ctx : (i + 1) * ctx][None]
        with torch.no_grad():
            nlls.append(model(input_ids=window, labels=window).loss.double() * ctx)
    return math.exp(torch.stack(nlls).sum() / (n_samples * ctx))


def hf_sliding_perplexity(model, ids: torch.Tensor, ctx: int, stride: int) -> tuple[float, int]:
    """The loop of Hugging Face's "Perplexity of fixed-length models" guide, counting valid labels exactly."""
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + ctx, len(ids))
        target_len = end - prev_end
        window = ids[begin:end][None]
        labels = window.clone()
        labels[:, :-target_len] = -100
        with torch.no_grad():
            loss = model(input_ids=window, labels=labels).loss.double()
        valid = int((labels[:, 1:] != -100).sum())
        nll_sum += float(loss) * valid
        n_tokens += valid
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll_sum / n_tokens), n_tokens


def test_perplexity_is_gptq_on_whole_windows(tiny_llama, tokenizer, text, ids):
    ctx = 64
    result = perplexity(tiny_llama, tokenizer, text, EvalConfig(ctx=ctx, max_tokens=6 * ctx, batch_size=4))
    assert result.perplexity == pytest.approx(gptq_perplexity(tiny_llama, ids[: 6 * ctx], ctx), rel=1e-5)
    assert (result.tokens, result.n_windows, result.stride) == (6 * (ctx - 1), 6, ctx)
    assert result.nll == pytest.approx(math.log(result.perplexity))


def test_sliding_window_matches_hugging_face_loop(tiny_llama, tokenizer, text, ids):
    ctx, stride = 64, 16
    n = ctx + 9 * stride  # the last window then ends at the text's end, where both schemes agree
    result = perplexity(tiny_llama, tokenizer, text, EvalConfig(ctx=ctx, stride=stride, max_tokens=n, batch_size=3))
    expected, expected_tokens = hf_sliding_perplexity(tiny_llama, ids[:n], ctx, stride)
    assert result.tokens == expected_tokens == n - 1
    assert result.perplexity == pytest.approx(expected, rel=1e-5)
    assert "stride 16" in result.definitions()["perplexity"]


def test_batch_size_does_not_change_the_number(tiny_llama, tokenizer, text):
    one = perplexity(tiny_llama, tokenizer, text, EvalConfig(ctx=48, stride=40, max_tokens=500, batch_size=1))
    many = perplexity(tiny_llama, tokenizer, text, EvalConfig(ctx=48, stride=40, max_tokens=500, batch_size=7))
    assert many.perplexity == pytest.approx(one.perplexity, rel=1e-5)
    assert many.tokens == one.tokens == 499


def test_bf16_runs_in_bf16_and_stays_close(tiny_llama, tokenizer, text):
    config = EvalConfig(ctx=64, max_tokens=512)
    fp32 = perplexity(tiny_llama, tokenizer, text, config)
    bf16 = perplexity(tiny_llama, tokenizer, text, EvalConfig(ctx=64, max_tokens=512, dtype="bfloat16"))
    assert (fp32.dtype, bf16.dtype) == ("float32", "bfloat16")
    assert bf16.perplexity != fp32.perplexity  # autocast really ran in bf16
    assert bf16.perplexity == pytest.approx(fp32.perplexity, rel=0.02)
    assert next(tiny_llama.parameters()).dtype == torch.float32  # the model itself is untouched


def test_word_perplexity_and_bits_per_byte_share_the_total_nll(tiny_llama, tokenizer, text):
    result = perplexity(tiny_llama, tokenizer, text, EvalConfig(ctx=64, stride=32))
    total_nll = result.nll * result.tokens
    assert result.words == count_words(text) and result.bytes == len(text.encode("utf-8"))
    assert result.word_perplexity == pytest.approx(math.exp(total_nll / result.words))
    assert result.bits_per_byte == pytest.approx(total_nll / math.log(2) / result.bytes)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 400), ctx=st.integers(2, 64), data=st.data())
def test_windows_score_every_token_once(n, ctx, data):
    stride = data.draw(st.integers(1, ctx))
    windows = plan_windows(n, ctx, stride)
    scored = [t for w in windows for t in range(w.end - w.n_scored, w.end)]
    assert len(scored) == len(set(scored))
    assert all(w.end - w.begin == min(ctx, n) for w in windows)  # equal lengths: batches need no padding
    assert all(w.end - w.n_scored > w.begin for w in windows)  # every scored token has context in its window
    if stride < ctx:
        assert sorted(scored) == list(range(1, n))
    elif n % ctx == 0:  # GPTQ: all tokens but each window's first
        assert sorted(scored) == [t for t in range(1, n) if t % ctx]


# --- KL divergence and top-1 agreement ---------------------------------------------------------------------

def direct_kl(model_q, model_fp, ids: torch.Tensor, ctx: int) -> tuple[float, float]:
    """Mean KL(P_fp || P_q) and top-1 agreement over GPTQ windows, straight from F.kl_div."""
    windows = ids[: len(ids) // ctx * ctx].view(-1, ctx)
    with torch.no_grad():
        fp = torch.log_softmax(model_fp(windows).logits[:, :-1].double(), -1).flatten(0, 1)
        q = torch.log_softmax(model_q(windows).logits[:, :-1].double(), -1).flatten(0, 1)
    kl = F.kl_div(q, fp, log_target=True, reduction="none").sum(-1)
    return float(kl.mean()), float((fp.argmax(-1) == q.argmax(-1)).double().mean())


def test_identical_models_have_zero_kl_and_full_agreement(tiny_llama, tokenizer, text):
    config = EvalConfig(ctx=64, max_tokens=512, top_k=16)
    paired = compare_logits(tiny_llama, tiny_llama, tokenizer, text, config)
    cached = perplexity(tiny_llama, tokenizer, text, config, reference_logprobs(tiny_llama, tokenizer, text, config))
    for divergence in (paired, cached.divergence):
        assert divergence.kl_divergence == pytest.approx(0.0, abs=1e-9)
        assert divergence.top1_agreement == 1.0
        assert divergence.positions == 8 * 63


def test_perturbed_model_kl_matches_direct_computation(tiny_llama, tokenizer, text, ids):
    noisy = _perturbed(tiny_llama, 0.5)
    config = EvalConfig(ctx=64, max_tokens=512, top_k=4096)
    expected_kl, expected_top1 = direct_kl(noisy, tiny_llama, ids[:512], 64)
    paired = compare_logits(noisy, tiny_llama, tokenizer, text, config)
    reference = reference_logprobs(tiny_llama, tokenizer, text, config)
    cached = perplexity(noisy, tokenizer, text, config, reference)
    assert expected_kl > 1e-4 and expected_top1 < 1.0
    for divergence in (paired, cached.divergence):
        assert divergence.exact
        assert divergence.kl_divergence == pytest.approx(expected_kl, rel=1e-4)
        assert divergence.top1_agreement == pytest.approx(expected_top1)
    assert cached.perplexity == pytest.approx(perplexity(noisy, tokenizer, text, config).perplexity)
    assert reference.result.perplexity == pytest.approx(perplexity(tiny_llama, tokenizer, text, config).perplexity)


def test_top_k_reference_is_a_lower_bound(tiny_llama, tokenizer, text):
    noisy = _perturbed(tiny_llama, 0.5)
    exact = compare_logits(noisy, tiny_llama, tokenizer, text, EvalConfig(ctx=64, max_tokens=512))
    config = EvalConfig(ctx=64, max_tokens=512, top_k=32)
    bound = perplexity(noisy, tokenizer, text, config, reference_logprobs(tiny_llama, tokenizer, text, config))
    assert not bound.divergence.exact and 0 < bound.divergence.reference_mass < 1
    assert 0 < bound.divergence.kl_divergence <= exact.kl_divergence + 1e-9
    assert bound.divergence.top1_agreement == pytest.approx(exact.top1_agreement)


def test_reference_from_other_windows_is_refused(tiny_llama, tokenizer, text):
    reference = reference_logprobs(tiny_llama, tokenizer, text, EvalConfig(ctx=64, max_tokens=256))
    with pytest.raises(FormatError, match="other windows"):
        perplexity(tiny_llama, tokenizer, text, EvalConfig(ctx=32, max_tokens=256), reference)


# --- encoder fidelity --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def few_sentences(text) -> list[str]:
    return sentences(text, n=16)


def test_fidelity_is_one_for_the_same_encoder_and_drops_when_perturbed(bundled_encoder, few_sentences):
    model, tok = bundled_encoder.model, bundled_encoder.tokenizer
    reference = embed(model, tok, few_sentences)
    same = embedding_fidelity(model, tok, few_sentences, reference)
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for p in noisy.encoder.parameters():
            p.add_(torch.randn_like(p) * 0.3 * p.abs().mean())
    moved = embedding_fidelity(noisy, tok, few_sentences, reference)
    assert same.fidelity == pytest.approx(1.0, abs=1e-9) and same.n_sentences == 16
    assert moved.min_cosine <= moved.fidelity < 0.9999


def test_mean_pooling_ignores_padding(bundled_encoder, few_sentences):
    model, tok = bundled_encoder.model, bundled_encoder.tokenizer
    short = min(few_sentences, key=len)
    alone = embed(model, tok, [short])
    padded = embed(model, tok, [short, max(few_sentences, key=len)])
    assert torch.allclose(alone[0], padded[0], atol=1e-5)


def test_evaluate_dispatches_on_kind(tiny_llama, tokenizer, bundled_encoder, text):
    config = EvalConfig(ctx=64, max_tokens=256, n_sentences=16)
    causal = evaluate(tiny_llama, tokenizer, "causal", text, config)
    reference = build_reference(bundled_encoder.model, bundled_encoder.tokenizer, "encoder", text, config)
    encoder = evaluate(bundled_encoder.model, bundled_encoder.tokenizer, "encoder", text, config, reference)
    assert (causal.metric, encoder.metric) == ("perplexity", "fidelity")
    assert causal.value == causal.perplexity > 1 and encoder.value == pytest.approx(1.0)
    with pytest.raises(FormatError):
        evaluate(tiny_llama, tokenizer, "decoder", text, config)


# --- text sources ------------------------------------------------------------------------------------------

def test_local_file_gives_the_same_number_as_the_string(tiny_llama, tokenizer, tmp_path):
    with open(WIKITEXT, encoding="utf-8") as f:
        wiki = f.read(5000)
    path = tmp_path / "wiki.txt"
    path.write_text(wiki, encoding="utf-8")
    config = EvalConfig(ctx=64)
    from_file = perplexity(tiny_llama, tokenizer, load_text(str(path)), config)
    assert from_file == perplexity(tiny_llama, tokenizer, wiki, config)


def test_undecodable_bytes_are_replaced_not_fatal(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(("caf\u00e9 na\u00efve " * 40).encode("latin-1"))
    text = load_text(str(path))
    assert "\ufffd" in text and text.startswith("caf")
    assert decode_text("\ufeffhello world ".encode() * 30).startswith("hello")  # BOM dropped


@pytest.mark.parametrize("content", [b"", b"   \n\n", b"too short"])
def test_empty_or_tiny_files_are_data_errors(tmp_path, content):
    path = tmp_path / "small.txt"
    path.write_bytes(content)
    with pytest.raises(DataError):
        load_text(str(path))


@pytest.mark.parametrize("source", ["no/such/file.txt", "wikitext3", "."])
def test_unknown_sources_are_data_errors(source):
    with pytest.raises(DataError):
        load_text(source)


def test_too_few_tokens_is_a_data_error(tiny_llama, tokenizer, text):
    with pytest.raises(DataError, match="tokens"):
        perplexity(tiny_llama, tokenizer, text, EvalConfig(ctx=64, max_tokens=8))


def test_wikitext2_offline_fails_fast_with_advice():
    if hub_unreachable_reason() is None:
        pytest.skip("the Hugging Face hub is reachable here; this test is for offline machines")
    start = time.perf_counter()
    with pytest.raises(DataError, match="heldout"):
        load_text("wikitext2")
    assert time.perf_counter() - start < 30


def test_sentences_are_deterministic_and_bounded(text):
    first, second = sentences(text, n=40), sentences(text, n=40)
    assert first == second and len(first) == 40
    assert all(24 <= len(s) <= 300 for s in first)


@pytest.mark.parametrize("kwargs", [dict(ctx=32, stride=64), dict(dtype="fp8"), dict(batch_size=0), dict(ctx=1)])
def test_bad_settings_are_format_errors(kwargs):
    with pytest.raises(FormatError):
        EvalConfig(**kwargs)


def test_ctx_longer_than_the_model_is_refused(tiny_llama, tokenizer, text):
    assert perplexity(tiny_llama, tokenizer, text, EvalConfig(ctx=257, max_tokens=600)).ctx == 257  # sees 256
    with pytest.raises(FormatError, match="256 positions"):
        perplexity(tiny_llama, tokenizer, text, EvalConfig(ctx=258))


# --- the eval command --------------------------------------------------------------------------------------

def test_cli_eval_json(bundled_lm_path, tmp_path, capsys):
    path = tmp_path / "wiki.txt"
    with open(WIKITEXT, encoding="utf-8") as f:
        path.write_text(f.read(8000), encoding="utf-8")
    code = main(["eval", str(bundled_lm_path), "--text", str(path), "--ctx", "64", "--max-tokens", "512", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert {"perplexity", "word_perplexity", "bits_per_byte", "tokens", "ctx", "stride"} <= out.keys()
    assert (out["tokens"], out["ctx"], out["stride"], out["kind"]) == (8 * 63, 64, 64, "causal")
    assert 1 < out["perplexity"] < 4096 and out["bits_per_byte"] > 0


def test_cli_eval_encoder_reports_fidelity(capsys):
    code = main(["eval", "all-MiniLM-L6-v2", "--sentences", "16", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["kind"] == "encoder" and "perplexity" not in out
    assert out["fidelity"] == pytest.approx(1.0) and out["n_sentences"] == 16


def test_cli_eval_bad_text_is_one_line_exit_2(bundled_lm_path, capsys):
    code = main(["eval", str(bundled_lm_path), "--text", "/no/such/text.txt"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no text source" in err
