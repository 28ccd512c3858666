"""Sequential evaluation: the windows through one block at a time give the in-memory perplexity.

``quantlab eval FOLDER --sequential`` is for checkpoints larger than memory (an 8B export); here
the same numbers are checked on small models of the same layouts: the bundled LM, a sharded bf16
model with an untied head, Qwen2's real 151,936-token vocabulary, and QuantLab's own symmetric and
asymmetric exports (dequantized block by block from the stored codes).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

from quantlab.cli import main as cli_main
from quantlab.errors import ModelLoadError
from quantlab.evaluation import EvalConfig, load_text
from quantlab.evaluation.perplexity import perplexity
from quantlab.models.lazy import open_lazy
from quantlab.models.loading import BUNDLED_LM, load_model, resolve_source
from quantlab.recipe import parse_config_name
from quantlab.runs.export import export_compressed
from quantlab.runs.pipeline import quantize_model
from quantlab.runs.sequential_eval import perplexity_sequential

CONFIG = EvalConfig(max_tokens=2048)


def bundled_tokenizer() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_file=str(Path(resolve_source(BUNDLED_LM)) / "tokenizer.json"))


def both(source, config: EvalConfig = CONFIG):
    """(in memory, sequential) perplexity results of ``source``."""
    text = load_text("heldout")
    loaded = load_model(source, device="cpu")
    whole = perplexity(loaded.model, loaded.tokenizer, text, config)
    reports = []
    streamed = perplexity_sequential(open_lazy(source, device="cpu", prequantized_ok=True), text, config,
                                     on_block=reports.append)
    assert [r.index for r in reports] == list(range(loaded.structure.n_blocks))
    return whole, streamed


def assert_same(whole, streamed) -> None:
    assert streamed.n_windows == whole.n_windows and streamed.tokens == whole.tokens
    assert streamed.perplexity == pytest.approx(whole.perplexity, rel=1e-6)
    assert streamed.window_nll == pytest.approx(whole.window_nll, rel=1e-6)
    assert streamed.bits_per_byte == pytest.approx(whole.bits_per_byte, rel=1e-6)


def test_bundled_lm_sequential_equals_in_memory():
    assert_same(*both(BUNDLED_LM, EvalConfig(max_tokens=2048, batch_size=3)))  # a short last batch too


def test_sharded_bf16_sequential_equals_in_memory(bf16_untied):
    """The conftest's bf16 Llama: several shards, an untied head."""
    whole, streamed = both(bf16_untied)
    assert whole.dtype == streamed.dtype == "bfloat16"
    assert_same(whole, streamed)


def test_real_qwen_vocabulary_with_a_tied_head(tmp_path):
    """Qwen2's 151,936 tokens, tied head (read from the embeddings, not the files)."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=151_936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)
    folder = tmp_path / "qwen-vocab"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    bundled_tokenizer().save_pretrained(folder)
    assert_same(*both(folder, EvalConfig(max_tokens=1024, ctx=256)))


@pytest.mark.parametrize("name", ["int4-g64", "int4-g64-asym", "gptq-int4-g64"])
def test_exports_evaluate_as_stored_block_by_block(name, tmp_path):
    loaded = load_model(BUNDLED_LM, device="cpu")
    model, _ = quantize_model(loaded, parse_config_name(name), evaluate_quality=False)
    export = export_compressed(model, tmp_path / name, loaded.tokenizer).path
    in_memory_q = perplexity(model, loaded.tokenizer, load_text("heldout"), CONFIG)
    whole, streamed = both(export)
    assert_same(whole, streamed)
    assert streamed.perplexity == pytest.approx(in_memory_q.perplexity, rel=1e-3)  # the export is the model


def test_cli_sequential_prints_blocks_and_the_same_numbers(capsys):
    assert cli_main(["eval", BUNDLED_LM, "--max-tokens", "1024", "--json"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert cli_main(["eval", BUNDLED_LM, "--max-tokens", "1024", "--json", "--sequential"]) == 0
    captured = capsys.readouterr()
    streamed = json.loads(captured.out)
    assert streamed["sequential"] is True
    assert streamed["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-6)
    assert "block 4 of 4:" in captured.err and "RSS" in captured.err


def test_sequential_eval_refuses_what_it_cannot_read_in_one_line(tmp_path, tiny_model_dirs, capsys):
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        open_lazy(tmp_path / "missing", prequantized_ok=True)
    assert cli_main(["eval", str(tiny_model_dirs["bert"]), "--sequential"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "causal LMs" in err[0], err


def test_quantizing_a_prequantized_folder_sequentially_is_still_refused(tmp_path):
    loaded = load_model(BUNDLED_LM, device="cpu")
    model, _ = quantize_model(loaded, parse_config_name("int4-g64"), evaluate_quality=False)
    export = export_compressed(model, tmp_path / "q", loaded.tokenizer).path
    with pytest.raises(ModelLoadError, match="pre-quantized"):
        open_lazy(export)
