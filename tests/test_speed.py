"""Measured speed and memory: real int8 kernels on CPU (and torchao's on CUDA), never changing the model.

Timings are only checked for being measured (positive, labelled); ratios belong in bench/.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

from quantlab.models.architectures import find_linears
from quantlab.cli import main
from quantlab.texts.corpus import read_split
from quantlab.errors import FormatError
from quantlab.runs.speed import (
    SpeedSettings, build_variant, default_variants, measure_speed, ratios, theoretical_bytes, weight_bytes,
)

QUICK = SpeedSettings(prompt_tokens=16, decode_tokens=4, repeats=1)


@pytest.fixture(scope="module")
def lm_results(bundled_lm):
    before = {k: v.clone() for k, v in bundled_lm.model.state_dict().items()}
    results = measure_speed(bundled_lm.model, "causal", bundled_lm.name, settings=QUICK, device="cpu")
    return results, before


def test_every_cpu_variant_is_measured_and_labelled(lm_results):
    results, _ = lm_results
    assert [r.variant for r in results] == ["fp32", "bf16", "int8-dynamic"]
    for r in results:
        assert r.label == "measured" and r.device.startswith("cpu (")
        assert r.prefill_ms_per_token > 0 and r.decode_ms_per_token > 0
        assert (r.prompt_tokens, r.decode_tokens, r.repeats) == (16, 4, 1)
    assert "int8 GEMM" in results[2].backend


def test_memory_follows_the_weights(lm_results, bundled_lm):
    fp32, bf16, int8 = lm_results[0]
    # In memory there is also the rotary table (a non-persistent buffer) that no file stores.
    assert fp32.tensor_bytes == pytest.approx(theoretical_bytes(bundled_lm.model, "fp32"), rel=1e-3)
    assert bf16.tensor_bytes == fp32.tensor_bytes // 2
    assert int8.tensor_bytes < bf16.tensor_bytes  # int8 block linears, fp32 embeddings
    # Resident growth is measured (RSS), so only bounds: it holds at least the weights, and not twice them.
    assert 0.9 * fp32.tensor_bytes < fp32.resident_bytes < 2 * fp32.tensor_bytes
    assert int8.resident_bytes < fp32.resident_bytes
    memory = ratios(lm_results[0])["int8-dynamic"]["resident_memory"]
    assert memory == pytest.approx(int8.resident_bytes / fp32.resident_bytes)


def test_the_measured_model_is_never_modified(lm_results, bundled_lm):
    _, before = lm_results
    after = bundled_lm.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, DynamicQuantizedLinear) for m in bundled_lm.model.modules())


def test_int8_variant_runs_real_int8_linears_in_the_blocks_only(bundled_lm):
    int8 = build_variant(bundled_lm.model, "int8-dynamic", torch.device("cpu"))
    converted = {name for name, m in int8.named_modules() if isinstance(m, DynamicQuantizedLinear)}
    assert converted == {info.name for info in find_linears(bundled_lm.model)}
    assert type(int8.lm_head) is torch.nn.Linear
    ids = bundled_lm.tokenizer(read_split("heldout", max_chars=4000), return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        expected, actual = bundled_lm.model(ids).logits, int8(ids).logits
    # Different arithmetic (int8 GEMMs, per-tensor activation scales), nearly the same predictions.
    assert 0 < (actual - expected).norm() / expected.norm() < 0.15
    assert (actual.argmax(-1) == expected.argmax(-1)).float().mean() > 0.8
    assert weight_bytes(int8) < weight_bytes(bundled_lm.model)


def test_encoder_is_measured_on_prefill_only(bundled_encoder):
    results = measure_speed(bundled_encoder.model, "encoder", bundled_encoder.name, ("fp32", "int8-dynamic"),
                            QUICK, device="cpu")
    assert all(r.decode_ms_per_token is None and r.decode_tokens == 0 for r in results)
    assert all(r.prefill_ms_per_token > 0 for r in results)
    assert ratios(results)["int8-dynamic"]["decode"] is None


def test_bad_settings_and_variants_are_refused(bundled_lm, lm_results):
    with pytest.raises(FormatError, match="prompt tokens must be at least 1"):
        SpeedSettings(prompt_tokens=0)
    with pytest.raises(FormatError, match="do not run on cpu"):
        measure_speed(bundled_lm.model, "causal", "lm", ("int4-weight-only",), QUICK, device="cpu")
    with pytest.raises(FormatError, match="no fp32 result"):
        ratios([r for r in lm_results[0] if r.variant != "fp32"])


def test_cli_prints_measured_json_next_to_theoretical_size(bundled_lm_path, capsys):
    code = main(["speed", str(bundled_lm_path), "--json", "--variants", "fp32,int8-dynamic",
                 "--prompt-tokens", "8", "--decode-tokens", "2", "--repeats", "1", "--device", "cpu"])
    document = json.loads(capsys.readouterr().out)
    assert code == 0 and document["label"] == "measured" and document["device"].startswith("cpu")
    by_variant = {r["variant"]: r for r in document["results"]}
    assert by_variant["int8-dynamic"]["theoretical_bytes"] < by_variant["fp32"]["theoretical_bytes"]
    assert document["ratios"]["fp32"]["prefill"] == 1.0


def test_cli_reports_a_cuda_variant_on_cpu_as_one_line(bundled_lm_path, capsys):
    code = main(["speed", str(bundled_lm_path), "--variants", "fp8", "--device", "cpu"])
    assert code == 2 and "do not run on cpu" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA kernels need a GPU")
def test_cuda_low_bit_kernels_are_measured_against_bf16(bundled_lm):
    pytest.importorskip("torchao")
    results = measure_speed(bundled_lm.model, "causal", bundled_lm.name, settings=QUICK, device="cuda")
    by_variant = {r.variant: r for r in results}
    assert set(by_variant) == set(default_variants(torch.device("cuda"))) and "int4-weight-only" in by_variant
    assert all(r.device.startswith("cuda") and r.prefill_ms_per_token > 0 for r in results)
    assert by_variant["int4-weight-only"].tensor_bytes < by_variant["bf16"].tensor_bytes
