"""Shared fixtures: tiny real models built from configs (fixed seed), saved copies, the bundled models.

Tiny causal models use the bundled LM's vocabulary (4096) so that its tokenizer works with them and
they can be evaluated on real text. Session-scoped models are shared: copy them
(``quantlab.models.loading.copy_model`` or ``copy.deepcopy``) before changing any weight.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModel, AutoModelForCausalLM, BertConfig, GPT2Config, LlamaConfig, OPTConfig, PreTrainedTokenizerFast,
)

from quantlab.errors import ModelLoadError
from quantlab.models.loading import BUNDLED_ENCODER, BUNDLED_LM, LoadedModel, load_model, read_header, resolve_source

SEED = 0
VOCAB = 4096  # the bundled LM's tokenizer vocabulary
HIDDEN, FFN, LAYERS, HEADS = 64, 128, 2, 4  # every dimension divisible by 32 and 64, so g32/g64 fit


def tiny_config(kind: str):
    """A small config of each architecture the tests cover (about 0.3-0.6 M parameters)."""
    if kind == "llama":
        return LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                           num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=256,
                           tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    if kind == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_inner=FFN, n_layer=LAYERS, n_head=HEADS,
                          n_positions=256, bos_token_id=0, eos_token_id=0)
    if kind == "opt":
        return OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, word_embed_proj_dim=HIDDEN, max_position_embeddings=256,
                         pad_token_id=1, bos_token_id=0, eos_token_id=0)
    if kind == "bert":
        return BertConfig(vocab_size=1024, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                          num_attention_heads=HEADS, max_position_embeddings=256)
    raise ValueError(f"no tiny config for {kind!r}")


def build_tiny(kind: str) -> torch.nn.Module:
    """A freshly initialised tiny model (same weights every time: fixed seed), eval mode."""
    torch.manual_seed(SEED)
    auto = AutoModel if kind == "bert" else AutoModelForCausalLM
    return auto.from_config(tiny_config(kind)).eval()


def save_tiny(kind: str, folder: Path) -> Path:
    """Save a tiny model as a Hugging Face folder; causal ones get the bundled LM's tokenizer."""
    build_tiny(kind).save_pretrained(folder)
    if kind != "bert":
        PreTrainedTokenizerFast(tokenizer_file=str(Path(resolve_source(BUNDLED_LM)) / "tokenizer.json")) \
            .save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_llama() -> torch.nn.Module:
    return build_tiny("llama")


@pytest.fixture
def tiny_gpt2() -> torch.nn.Module:
    return build_tiny("gpt2")


@pytest.fixture
def tiny_opt() -> torch.nn.Module:
    return build_tiny("opt")


@pytest.fixture
def tiny_bert() -> torch.nn.Module:
    return build_tiny("bert")


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Saved folders (config, safetensors, tokenizer) of the tiny llama, gpt2, opt and bert models."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {kind: save_tiny(kind, root / kind) for kind in ("llama", "gpt2", "opt", "bert")}


@pytest.fixture(scope="session")
def bf16_untied(tmp_path_factory) -> Path:
    """A 2-block bf16 Llama with an untied head, saved as several shards: the 8B shape's layout in small."""
    config = tiny_config("llama")
    config.tie_word_embeddings = False
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("bf16") / "tiny-bf16"
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder, max_shard_size="300KB")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(Path(resolve_source(BUNDLED_LM)) / "tokenizer.json"))
    tokenizer.save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


@pytest.fixture(scope="session")
def bundled_lm_path(tmp_path_factory) -> Path:
    """A private copy of the bundled LM's folder.

    The trainer may rewrite the bundled folder while tests run; a copy taken mid-write is detected
    by its safetensors header and taken again.
    """
    source = Path(resolve_source(BUNDLED_LM))
    target = tmp_path_factory.mktemp("bundled") / BUNDLED_LM
    for _attempt in range(10):
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)
        try:
            read_header(target / "model.safetensors")
            return target
        except (ModelLoadError, FileNotFoundError):
            time.sleep(1.0)
    pytest.fail(f"could not take a consistent copy of {source}")


@pytest.fixture(scope="session")
def bundled_lm(bundled_lm_path) -> LoadedModel:
    """The bundled LM on the CPU, shared by the session: copy it before changing weights."""
    return load_model(bundled_lm_path, device="cpu")


@pytest.fixture(scope="session")
def bundled_encoder() -> LoadedModel:
    """all-MiniLM-L6-v2 from its package, shared by the session: copy it before changing weights."""
    return load_model(BUNDLED_ENCODER, device="cpu")
