"""Standard errors of perplexity and of paired differences, and the deployer's table built on them."""

from __future__ import annotations

import math

import pytest
import torch

from quantlab.analysis import runs as run_tables
from quantlab.errors import DataError
from quantlab.evaluation import EvalConfig, load_text, perplexity
from quantlab.evaluation.uncertainty import paired_difference, ratio_mean, within_noise
from quantlab.recipe import CalibConfig, parse_config_name
from quantlab.runs.pipeline import QuantSession, quantize_model

CALIB = CalibConfig(n_samples=2, seq_len=32, seed=3)


def test_ratio_mean_is_the_docstring_example_and_std_over_sqrt_k_for_equal_windows():
    diff = paired_difference([10.5, 12.1], [10.0, 12.0], [4, 4])
    assert diff.mean == pytest.approx(0.075) and diff.se == pytest.approx(0.05)
    sums, counts = [3.0, 5.0, 4.0, 8.0], [2, 2, 2, 2]
    means = torch.tensor(sums, dtype=torch.float64) / 2
    assert ratio_mean(sums, counts).se == pytest.approx(float(means.std() / 2))
    assert math.isnan(ratio_mean([3.0], [2]).se)  # one window: no spread to measure


def test_unpaired_windows_and_unknown_errors_are_refused_or_unknown():
    with pytest.raises(DataError, match="same windows"):
        paired_difference([1.0, 2.0], [1.0], [1, 1])
    assert within_noise(0.1, math.nan) is None
    assert within_noise(0.1, 0.1) is True and within_noise(0.5, 0.1) is False


def test_perplexity_keeps_each_windows_loss_and_its_standard_error(bundled_lm):
    text = load_text("heldout", max_chars=8000)
    result = perplexity(bundled_lm.model, bundled_lm.tokenizer, text, EvalConfig(ctx=64, max_tokens=640, batch_size=3))
    assert len(result.window_nll) == len(result.window_tokens) == result.n_windows == 10
    assert sum(result.window_tokens) == result.tokens
    assert math.fsum(result.window_nll) / result.tokens == pytest.approx(result.nll, rel=1e-12)
    assert 0 < result.perplexity_se < result.perplexity
    assert result.perplexity_se == pytest.approx(result.perplexity * result.nll_se)
    assert result.to_dict()["window_nll"] == list(result.window_nll)


@pytest.fixture(scope="module")
def runs(bundled_lm):
    session = QuantSession(bundled_lm, None, EvalConfig(ctx=64, max_tokens=1024))
    return [quantize_model(bundled_lm, parse_config_name(name, calib=CALIB), session=session)[1]
            for name in ("fp", "int8", "int4-g128", "int3-g128")]


def test_baseline_table_pairs_every_run_with_full_precision(runs):
    table = run_tables.baseline_table(runs, "bf16")
    fp = table.iloc[0]
    assert fp["baseline"] and fp["bits_per_weight"] == 16 and fp["delta_pct"] == 0 and fp["size_saved_pct"] == 0
    assert fp["total_bytes"] == runs[0].total_bytes / 2  # the fp32 model stored in bf16
    ppl = table["perplexity"].to_numpy()
    assert table["delta_pct"].iloc[1:].to_numpy() == pytest.approx(100 * (ppl[1:] / ppl[0] - 1), rel=1e-6)
    quantized = table.iloc[1:]
    assert (quantized["delta_pct_se"] > 0).all() and (table["perplexity_se"] > 0).all()
    # Pairing removes the text's own variation: the difference is far better known than either perplexity.
    assert (quantized["delta_pct_se"] < 100 * table["perplexity_se"].iloc[0] / ppl[0]).all()
    assert quantized["within_noise"].tolist() == [abs(d) < 2 * s for d, s in
                                                  zip(quantized["delta_pct"], quantized["delta_pct_se"])]
    assert (table["eval_tokens"] == runs[0].quality["tokens"]).all() and (table["ctx"] == 64).all()
    fp32 = run_tables.baseline_table(runs, "fp32")
    assert (fp32["size_saved_pct"].iloc[1:] > table["size_saved_pct"].iloc[1:]).all()  # fp32 flatters savings


def test_recommendation_is_the_smallest_within_tolerance(runs):
    table = run_tables.baseline_table(runs, "bf16")
    for tolerance in (0.5, 5.0, 50.0, 1000.0):
        pick = run_tables.recommend(table, "perplexity", tolerance)
        fits = table[~table["baseline"] & (table["delta_pct"] <= tolerance)]
        if fits.empty:
            assert pick is None
            continue
        smallest = fits.sort_values("total_bytes").iloc[0]
        assert pick.config == smallest["config"] and pick.delta_pct == pytest.approx(smallest["delta_pct"])
        assert f"within {tolerance:g} % of the bf16 baseline" in pick.sentence() and pick.config in pick.sentence()
    assert run_tables.recommend(table, "perplexity", 1000.0).config == "rtn-int3-g128"


def test_records_without_window_losses_say_se_unavailable(runs):
    old = [type(r)(r.config, r.layers, r.bits_per_weight, r.total_bytes, r.seconds,
                   {k: v for k, v in r.quality.items() if not k.startswith("window_")}) for r in runs]
    table = run_tables.baseline_table(old, "bf16")
    assert not run_tables.has_standard_errors(table)
    assert table["delta_pct_se"].iloc[1:].isna().all() and table["within_noise"].iloc[1:].isna().all()
    assert table["delta_pct"].iloc[1:].to_numpy() == pytest.approx(
        run_tables.baseline_table(runs, "bf16")["delta_pct"].iloc[1:].to_numpy())
    assert "SE unavailable" in run_tables.recommend(table, "perplexity", 1000.0).sentence()


def test_a_table_without_full_precision_is_refused(runs):
    with pytest.raises(DataError, match="add fp"):
        run_tables.baseline_table(runs[1:], "bf16")
    with pytest.raises(DataError, match="unknown baseline"):
        run_tables.baseline_table(runs, "int8")


def test_calibration_set_building_is_timed_apart_from_the_run(bundled_lm):
    session = QuantSession(bundled_lm, None, EvalConfig(ctx=64, max_tokens=256))
    calib = CalibConfig(n_samples=2, seq_len=32, seed=11)
    first = quantize_model(bundled_lm, parse_config_name("int8", calib=calib), session=session)[1]
    second = quantize_model(bundled_lm, parse_config_name("int4-g128", calib=calib), session=session)[1]
    assert first.calibration_seconds > 0 and second.calibration_seconds < first.calibration_seconds
    assert type(first).from_dict(first.to_dict()).calibration_seconds == first.calibration_seconds
