"""The pages with the scaled-block formats (MXFP4, NVFP4, FP8 block) chosen in the sidebar."""

from __future__ import annotations

from tests.test_app_pages import metrics, open_page


def choose_kind(at, kind: str):
    at.selectbox(key="sb_kind").set_value(kind).run()
    assert not at.exception, at.exception
    return at


def test_playground_shows_e2m1_and_the_worked_block():
    at = open_page("playground")
    e2m1 = next(d.value for d in at.dataframe if "mantissa" in d.value)
    assert sorted(set(e2m1["value"].abs())) == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    summary = next(d.value for d in at.dataframe if "working scale s" in d.value)
    mx, nv = summary.set_index("format").loc["mxfp4"], summary.set_index("format").loc["nvfp4"]
    assert mx["working scale s"] == 0.25  # absmax 1.2 -> 2^0 -> s = 2^-2
    assert nv["absmax / grid top"] <= 1.0625 and nv["mse"] < mx["mse"]


def test_weights_page_overlays_the_mxfp4_grid_of_a_block():
    at = choose_kind(open_page("weights"), "mxfp4")
    assert metrics(at)["Bits per weight"] == "4.250"
    assert len(at.get("plotly_chart")) == 4


def test_clipping_page_shows_how_the_block_scales_fit():
    at = choose_kind(open_page("clipping"), "nvfp4")
    fit = next(d.value for d in at.dataframe if "blocks clipping" in d.value).set_index("format")
    assert set(fit.index) == {"nvfp4", "mxfp4"}
    assert fit.loc["nvfp4", "mean range used"] > fit.loc["mxfp4", "mean range used"]
    assert fit.loc["mxfp4", "worst overshoot"] < 7 / 6 + 1e-6


def test_size_page_lists_the_block_formats_at_7b():
    at = open_page("size")
    reference = at.dataframe[1].value
    row = reference[(reference["model"] == "7B") & (reference["format"] == "mxfp4")].iloc[0]
    assert row["bits_per_weight"] == 4.25
    assert {"nvfp4", "fp8-block"} <= set(reference["format"])


def test_quality_page_opens_the_shipped_formats_sweep():
    import pytest

    from quantlab.runs import records

    shipped = records.bundled_sweeps()
    expected = records.read_record(shipped["pystdlib-llama-4m-formats"])
    at = open_page("quality")
    at.selectbox(key="q_example").set_value("pystdlib-llama-4m-formats")
    at.button(key="q_open_example").click().run()
    assert not at.exception
    table = at.dataframe[0].value
    assert {"rtn-mxfp4", "gptq-nvfp4", "rtn-fp8-block"} <= set(table["config"])
    assert table["perplexity"].tolist() == pytest.approx([r.quality["perplexity"] for r in expected.runs])


def test_outliers_page_shows_the_rotation_before_and_after():
    at = open_page("outliers")
    at.button(key="o_rotate").click().run()
    assert not at.exception, at.exception
    summary = next(d.value for d in at.dataframe if "excess kurtosis" in d.value)
    assert summary["input"].tolist() == ["before rotation", "after rotation"]
    assert len(at.get("plotly_chart")) >= 1
