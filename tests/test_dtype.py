"""Models load in their checkpoint's dtype; the numerics that need fp32 stay fp32 per layer.

A bf16 checkpoint stays bf16 (half of fp32's memory), is quantized with fp32 Hessians and fp32
error statistics, and evaluates; the bundled fp32 LM gives the same results as before (auto = fp32).
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from quantlab.evaluation import EvalConfig, evaluate, load_text
from quantlab.models.loading import load_model
from quantlab.recipe import CalibConfig, parse_config_name
from quantlab.runs.pipeline import quantize_model

from conftest import build_tiny, save_tiny

CALIB = CalibConfig(n_samples=4, seq_len=64)


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    folder = save_tiny("llama", tmp_path_factory.mktemp("bf16") / "llama")
    build_tiny("llama").to(torch.bfloat16).save_pretrained(folder)  # same weights, stored in bf16
    return folder


def test_auto_keeps_the_checkpoint_dtype(bf16_folder, bundled_lm_path):
    assert next(load_model(bf16_folder, device="cpu").model.parameters()).dtype == torch.bfloat16
    assert next(load_model(bf16_folder, device="cpu", dtype="fp32").model.parameters()).dtype == torch.float32
    assert next(load_model(bf16_folder, device="cpu", dtype="fp16").model.parameters()).dtype == torch.float16
    assert next(load_model(bundled_lm_path, device="cpu").model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("name", ["int4-g32", "gptq-int4-g32"])
def test_a_bf16_model_quantizes_with_fp32_numerics(bf16_folder, name):
    loaded = load_model(bf16_folder, device="cpu")
    config = parse_config_name(name, calib=CALIB)
    model, result = quantize_model(loaded, config, evaluate_quality=False)
    as_fp32 = load_model(bf16_folder, device="cpu", dtype="fp32")  # the same bf16 values, held in fp32
    _, reference = quantize_model(as_fp32, config, evaluate_quality=False)
    assert len(result.layers) == len(reference.layers) == len(loaded.structure.linears)
    for bf16_layer, fp32_layer in zip(result.layers, reference.layers):
        assert math.isfinite(bf16_layer.output_error) and bf16_layer.output_error > 0
        # Weights and statistics are fp32 in both runs; only the block's bf16 forward passes differ.
        assert bf16_layer.weight_error == pytest.approx(fp32_layer.weight_error, rel=0.05)
    text = load_text("heldout")
    ppl = evaluate(model, loaded.tokenizer, "causal", text, EvalConfig(max_tokens=1024)).perplexity
    assert math.isfinite(ppl)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_bundled_fp32_results_do_not_change_with_auto(bundled_lm_path):
    config = parse_config_name("gptq-int4-g64", calib=CALIB)
    auto = quantize_model(load_model(bundled_lm_path, device="cpu"), config, evaluate_quality=False)[1]
    fp32 = quantize_model(load_model(bundled_lm_path, device="cpu", dtype=torch.float32), config,
                          evaluate_quality=False)[1]
    assert [r.output_error for r in auto.layers] == [r.output_error for r in fp32.layers]


def test_cli_dtype_option(bf16_folder):
    bad = subprocess.run([sys.executable, "-m", "quantlab", "eval", str(bf16_folder), "--dtype", "int8"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--dtype" in bad.stderr and "Traceback" not in bad.stderr
    ok = subprocess.run([sys.executable, "-m", "quantlab", "eval", str(bf16_folder), "--dtype", "bf16",
                         "--max-tokens", "256", "--json"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert '"dtype": "bfloat16"' in ok.stdout
