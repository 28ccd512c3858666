"""The pipeline on the bundled LM: quality bars of the issue, the cached model left alone, the CLI.

Quality comparisons are paired (same calibration windows, same evaluation tokens), so a modest
number of evaluation tokens separates methods reliably.
"""

from __future__ import annotations

import json

import pytest
import torch

from quantlab.recipe import CalibConfig, RunResult, parse_config_name
from quantlab.cli import main
from quantlab.evaluation import EvalConfig
from quantlab.runs.pipeline import QuantSession, quantize_model, run_sweep, sweep_configs
from quantlab.runs.records import read_record

CALIB = CalibConfig(n_samples=16, seq_len=256)
EVAL_TOKENS = 8192


def checksum(model: torch.nn.Module) -> float:
    return sum(t.double().abs().sum().item() for t in model.state_dict().values())


@pytest.fixture(scope="module")
def runs(bundled_lm):
    """FP and RTN/GPTQ at INT4 g128, INT3 g128 and INT8 per-channel, on one shared session."""
    session = QuantSession(bundled_lm, eval_config=EvalConfig(ctx=256, max_tokens=EVAL_TOKENS))
    before = checksum(bundled_lm.model)
    names = ["fp", "int8", "int4-g128", "gptq-int4-g128", "int3-g128", "gptq-int3-g128"]
    results = {name: quantize_model(bundled_lm, parse_config_name(name, calib=CALIB), session=session)[1]
               for name in names}
    return results, before


def test_the_cached_model_is_never_modified(bundled_lm, runs):
    _, before = runs
    assert checksum(bundled_lm.model) == before
    assert all(type(m).__name__ != "QuantizedLinear" for m in bundled_lm.model.modules())


@pytest.mark.parametrize("fmt", ["int4-g128", "int3-g128"])
def test_gptq_output_error_is_at_most_rtns_on_every_layer(runs, fmt):
    results, _ = runs
    rtn, gptq = results[fmt].layers, results[f"gptq-{fmt}"].layers
    assert [r.name for r in rtn] == [g.name for g in gptq] and len(rtn) == 28
    for r, g in zip(rtn, gptq):
        assert g.output_error <= r.output_error, r.name
        assert g.extra["fallback"] is False


@pytest.mark.parametrize("fmt", ["int4-g128", "int3-g128"])
def test_gptq_perplexity_is_below_rtns(runs, fmt):
    results, _ = runs
    assert results[f"gptq-{fmt}"].quality["perplexity"] < results[fmt].quality["perplexity"]


def test_int8_per_channel_stays_within_one_percent_of_full_precision(runs):
    results, _ = runs
    fp, int8 = results["fp"].quality["perplexity"], results["int8"].quality["perplexity"]
    assert abs(int8 / fp - 1) < 0.01
    assert results["int3-g128"].quality["perplexity"] > fp  # and the evaluation does see quantization


def test_results_are_complete_and_round_trip_through_json(runs):
    results, _ = runs
    fp, gptq = results["fp"], results["gptq-int4-g128"]
    assert fp.quality["kl_divergence"] == 0.0 and fp.layers == () and fp.bits_per_weight == 32
    assert gptq.quality["kl_divergence"] > 0 and 0.5 < gptq.quality["top1_agreement"] < 1
    assert gptq.bits_per_weight == pytest.approx(4 + 16 / 128)
    assert gptq.total_bytes < results["int8"].total_bytes < fp.total_bytes
    again = RunResult.from_dict(json.loads(json.dumps(gptq.to_dict())))
    assert again.config == gptq.config and again.layers[3].output_error == gptq.layers[3].output_error


def test_kv_cache_quantization_shows_in_the_quality(bundled_lm):
    session = QuantSession(bundled_lm, eval_config=EvalConfig(ctx=256, max_tokens=2048))
    before = checksum(bundled_lm.model)
    model, result = quantize_model(bundled_lm, parse_config_name("kv-int4"), session=session)
    assert model is not bundled_lm.model and checksum(bundled_lm.model) == before
    assert result.quality["kl_divergence"] > 0 and result.layers == ()


def test_sweep_shares_one_session_and_reports_every_config(bundled_lm):
    configs = sweep_configs(["fp", "int4-g64"], CalibConfig(n_samples=4, seq_len=64))
    seen = []
    results = run_sweep(bundled_lm, configs, lambda f, m: seen.append(f), max_eval_tokens=1024)
    assert [r.config.name for r in results] == ["fp", "rtn-int4-g64"]
    assert seen == sorted(seen) and seen[-1] == 1.0
    assert results[1].quality["tokens"] == results[0].quality["tokens"] <= 1024


def test_quantize_command_prints_the_documented_json(bundled_lm_path, capsys):
    code = main(["quantize", str(bundled_lm_path), "--method", "gptq", "--format", "int4", "--group-size", "64",
                 "--calib-samples", "4", "--calib-len", "64", "--max-eval-tokens", "1024", "--json"])
    assert code == 0
    document = json.loads(capsys.readouterr().out)
    for key in ("perplexity", "bits_per_weight", "total_bytes", "seconds", "layers", "kl_divergence"):
        assert key in document
    assert document["name"] == "gptq-int4-g64" and len(document["layers"]) == 28
    assert {"output_error", "weight_error", "clipped_fraction", "seconds"} <= set(document["layers"][0])


def test_quantize_command_rejects_an_indivisible_group_size(bundled_lm_path, capsys):
    assert main(["quantize", str(bundled_lm_path), "--format", "int4", "--group-size", "100"]) == 2
    assert "does not divide" in capsys.readouterr().err


def test_sweep_command_writes_a_record_the_app_can_open(bundled_lm_path, tmp_path, capsys):
    out = tmp_path / "sweep.json"
    code = main(["sweep", str(bundled_lm_path), "--configs", "fp,int8", "--calib-samples", "4", "--calib-len", "64",
                 "--max-eval-tokens", "1024", "--out", str(out), "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert [r["config"] for r in printed["runs"]] == ["fp", "rtn-int8-per-channel"]
    record = read_record(out)
    assert [r.config.name for r in record.runs] == ["fp", "rtn-int8-per-channel"]
    assert record.runs[1].quality["perplexity"] == printed["runs"][1]["perplexity"]
