"""The deployer's answer on Quality vs bits and Compare, through AppTest: Δ %, standard errors, the
recommendation, any configuration name the grammar allows, and runs reused between the two pages."""

from __future__ import annotations

import math

import pytest
from streamlit.testing.v1 import AppTest

import pages.runs
from quantlab.runs import records
from tests.test_app_pages import APP, TIMEOUT, open_page

CALIB_SAMPLES = 3  # settings no other test uses, so that the shared run store starts empty for them


def _settings(at: AppTest, prefix: str) -> None:
    at.number_input(key=f"{prefix}_cs").set_value(CALIB_SAMPLES)
    at.select_slider(key=f"{prefix}_cl").set_value(64)
    at.select_slider(key=f"{prefix}_et").set_value(1024)


@pytest.fixture
def counted_runs(monkeypatch):
    """Every real quantize_model call the pages make, by configuration name."""
    calls = []
    real = pages.runs.quantize_model

    def counting(loaded, config, *args, **kwargs):
        calls.append(config.name)
        return real(loaded, config, *args, **kwargs)

    monkeypatch.setattr(pages.runs, "quantize_model", counting)
    return calls


def test_quality_reports_delta_se_noise_and_a_recommendation_and_compare_reuses_its_runs(counted_runs):
    at = open_page("quality")
    at.multiselect(key="q_configs").set_value(["int8", "gptq-int4-g64"])  # fp is added: it is the baseline
    _settings(at, "q")
    at.button(key="q_run").click().run()
    assert not at.exception
    assert counted_runs == ["fp", "rtn-int8-per-channel", "gptq-int4-g64"]
    table = at.dataframe[0].value
    assert list(table["config"]) == ["fp", "rtn-int8-per-channel", "gptq-int4-g64"]
    ppl = table["perplexity"].to_numpy()
    assert table["delta_pct"].tolist() == pytest.approx([0, *(100 * (ppl[1:] / ppl[0] - 1))], rel=1e-6)
    assert (table["perplexity_se"] > 0).all() and (table["delta_pct_se"].iloc[1:] > 0).all()
    noise = ["within noise" if abs(d) < 2 * s else "beyond noise"
             for d, s in zip(table["delta_pct"].iloc[1:], table["delta_pct_se"].iloc[1:])]
    assert table["noise"].tolist() == ["baseline", *noise]
    assert table["bits_per_weight"].iloc[0] == 16 and table["size_saved_pct"].iloc[0] == 0  # bf16 baseline
    assert (table["eval_tokens"] == table["eval_tokens"].iloc[0]).all() and (table["ctx"] > 0).all()
    assert table["calibration_seconds"].iloc[0] == 0 and table["calibration_seconds"].iloc[1] > 0
    assert "Measured on" in " ".join(c.value for c in at.caption)
    within = table[(table["config"] != "fp") & (table["delta_pct"] <= 1.0)]
    if within.empty:
        assert at.warning and "No configuration" in at.warning[0].value
    else:
        expected = within.sort_values("size_mib").iloc[0]["config"]
        assert at.success and f"**{expected}**" in at.success[0].value and "1 % of the bf16" in at.success[0].value
    at.number_input(key="q_tolerance").set_value(100.0).run()
    assert "**gptq-int4-g64**" in at.success[0].value  # the smallest of the three
    fp16 = at.dataframe[0].value["size_saved_pct"].iloc[1:]
    at.selectbox(key="q_baseline").set_value("fp32").run()
    assert (at.dataframe[0].value["size_saved_pct"].iloc[1:].to_numpy() > fp16.to_numpy()).all()
    assert len(at.get("plotly_chart")) == 3

    at.switch_page("pages/compare_page.py").run()
    at.multiselect(key="c_configs").set_value(["int8", "gptq-int4-g64"])
    _settings(at, "c")
    at.button(key="c_run").click().run()
    assert not at.exception
    assert counted_runs == ["fp", "rtn-int8-per-channel", "gptq-int4-g64"]  # nothing recomputed
    summary = at.dataframe[0].value
    assert summary["perplexity"].tolist() == pytest.approx(ppl.tolist())
    assert at.success and "Smallest configuration" in at.success[0].value
    deltas = [m.delta for m in at.metric if m.label == "Perplexity"]
    assert not deltas[0] and all("%" in d and "±" in d for d in deltas[1:])


def test_a_bad_configuration_name_is_a_message_not_a_crash():
    at = open_page("quality")
    at.multiselect(key="q_configs").set_value(["int4-g128", "int5-gg"])
    _settings(at, "q")
    at.button(key="q_run").click().run()
    assert not at.exception and at.error and "int5-gg" in at.error[0].value


def test_the_shipped_sweep_opens_and_says_its_standard_errors_are_unavailable():
    shipped = records.bundled_sweeps()["pystdlib-llama-4m-default"]
    expected = records.read_record(shipped)
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    at.switch_page("pages/quality_page.py").run()
    at.button(key="q_open_example").click().run()
    assert not at.exception
    table = at.dataframe[0].value
    assert len(table) == len(expected.runs)
    has_windows = all(r.quality.get("window_nll") for r in expected.runs)
    if has_windows:  # a record regenerated with per-window losses carries its standard errors
        assert table["delta_pct_se"].iloc[1:].notna().all()
    else:
        assert any("SE unavailable" in info.value for info in at.info)
        assert table["noise"].iloc[1:].eq("SE unavailable").all()
        assert table["delta_pct"].notna().all() and not math.isnan(table["delta_pct"].iloc[1])
