"""Every page of the app, run headless with Streamlit's AppTest on the bundled models, small settings.

Each test opens the app the way a browser does (app.py with its sidebar, then a page), asserts that
no exception reached the page, and checks what the page shows against numbers computed here.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from streamlit.testing.v1 import AppTest

from pages.common import SessionFolder
from quantlab.models import loading as models
from quantlab.runs import records
from quantlab.recipe import CalibConfig
from quantlab.analysis import sizes
from quantlab.runs.pipeline import run_sweep, sweep_configs
from quantlab.runs.records import write_record

APP = str(Path(__file__).resolve().parent.parent / "app.py")
TIMEOUT = 300  # generous: the CI machine may be busy; each page here takes seconds when idle
ENCODER = "Bundled encoder (all-MiniLM-L6-v2)"


def open_page(page: str, model: str | None = None, hub_id: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    if model is not None:
        at.selectbox(key="sb_model").set_value(model).run()
    if hub_id is not None:
        at.text_input(key="sb_hub_id").set_value(hub_id).run()
    at.switch_page(f"pages/{page}_page.py").run()
    assert not at.exception, at.exception
    return at


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def small_settings(at: AppTest, prefix: str) -> None:
    """The smallest calibration and evaluation sizes the run settings offer."""
    at.number_input(key=f"{prefix}_cs").set_value(2)
    at.select_slider(key=f"{prefix}_cl").set_value(64)
    at.select_slider(key=f"{prefix}_et").set_value(512)


def test_home_lists_every_page_and_the_glossary():
    at = open_page("home")
    assert at.title[0].value == "QuantLab"
    glossary = [m.value for m in at.expander[0].markdown]
    assert len(glossary) == 8 and any("zero-point" in g for g in glossary)


def test_model_page_counts_parameters_and_lists_every_tensor():
    at = open_page("model")
    loaded = models.load_model(models.BUNDLED_LM)
    n_params = sum(p.numel() for p in {id(p): p for p in loaded.model.parameters()}.values())
    shown = metrics(at)
    assert shown["Parameters"] == f"{n_params / 1e6:.2f} M"
    assert shown["Kind"] == "causal LM"
    assert float(shown["In int4-g128"].split()[0]) < float(shown["Full-precision size"].split()[0])
    listing = models.inspect_tensors(models.BUNDLED_LM)
    formats, layers = at.dataframe[0].value, at.dataframe[1].value
    assert len(layers) == len(listing.tensors)
    assert set(layers["role"]) >= {"q", "k", "v", "o", "gate", "up", "down", "embedding", "norm"}
    assert list(formats["format"]) == [f.name for f in sizes.size_variants(variants=((True, "fp16"),))]
    assert at.get("plotly_chart")


def test_model_page_on_the_encoder():
    at = open_page("model", model=ENCODER)
    assert metrics(at)["Kind"] == "encoder"
    assert metrics(at)["Blocks"] == "6"


def test_playground_outlier_blows_up_the_scale():
    at = open_page("playground")
    before = metrics(at)
    # The example's largest |value| is 1.2: INT4 symmetric (full range) gives s = 1.2 / 7.5, in fp16.
    fp16_scale = torch.tensor(1.2 / 7.5).half().item()
    assert before["Scale"] == f"{fp16_scale:.4g}"
    assert any(r"\frac{1.2}{7.5}" in latex.value for latex in at.latex)  # the numbers, in the formula
    assert any("fp16 of 0.16" in caption.value for caption in at.caption)
    table = next(d.value for d in at.dataframe if "code" in d.value)
    assert len(table) == 8 and table["code"].between(-8, 7).all()
    at.radio(key="pg_scale_dtype").set_value("fp32").run()
    assert not any("fp16 of" in caption.value for caption in at.caption)
    at.radio(key="pg_scale_dtype").set_value("fp16")
    at.button(key="pg_outlier").click().run()
    after = metrics(at)
    table = next(d.value for d in at.dataframe if "code" in d.value)
    assert len(table) == 9 and table["value"].iloc[-1] == 12.0  # appended: the typed values are all kept
    assert float(after["Scale"]) > 9 * float(before["Scale"])
    assert float(after["Mean squared error"]) > 10 * float(before["Mean squared error"])
    at.radio(key="pg_sym").set_value("asymmetric").run()
    assert any(r"\mathrm{round}\left(\frac{1.2}" in latex.value for latex in at.latex)  # z with its numbers
    at.radio(key="pg_gran").set_value("groups").run()
    assert not at.exception
    grouped = metrics(at)
    assert grouped["Zero-point"] != "none"
    assert "Scale (group 2)" in grouped  # 9 values in groups of 3: the outlier's group is charted
    assert at.get("plotly_chart") and at.latex


def test_playground_shows_the_full_and_restricted_grids_side_by_side():
    at = open_page("playground")
    summary = range_table(at)
    assert summary["grid"].tolist() == ["full", "restricted"] and summary["codes"].tolist() == ["[-8, 7]", "[-7, 7]"]
    full, restricted = summary["scale (first group)"]
    assert full == pytest.approx(torch.tensor(1.2 / 7.5).half().item()) and restricted > full
    assert len(at.get("plotly_chart")) == 3  # the main chart and one per grid
    # The outlier (10 x 1.2 = 12) sets the scale: 12 / s = 7.5 (s rounded down in fp16: 7.502) is clamped to
    # 7 on the full grid, half a step short; the restricted grid (12 / s = 7) holds it.
    at.button(key="pg_outlier").click().run()
    assert range_table(at)["values clipped"].tolist() == [1, 0]
    at.radio(key="pg_range").set_value("restricted").run()
    assert not at.exception
    assert metrics(at)["Scale"] == f"{range_table(at)['scale (first group)'].iloc[1]:.4g}"
    assert metrics(at)["Values clipped"] == "0"
    assert any("{7}" in latex.value for latex in at.latex)  # s = max|x| / 7 in the formula


def range_table(at: AppTest):
    return next(d.value for d in at.dataframe if "grid" in d.value)


def test_weights_page_shows_histograms_and_compares_two_formats():
    at = open_page("weights")
    shown = metrics(at)
    assert shown["Bits per weight"] == "4.125"  # the sidebar's default: INT4, groups of 128, fp16 scales
    assert len(at.get("plotly_chart")) == 4
    comparison = at.dataframe[0].value
    assert len(comparison) == 2 and comparison["format"].iloc[0] == "int4-g128"
    int8_row = comparison[comparison["format"].str.startswith("int8")]
    if len(int8_row):
        assert int8_row["relative_error"].iloc[0] < comparison["relative_error"].iloc[0]


def test_clipping_page_finds_a_minimum():
    at = open_page("clipping")
    best = float(metrics(at)["Best clip ratio"])
    assert 0.3 <= best <= 1.0
    methods = at.dataframe[0].value
    assert len(methods) == 6 and set(methods["scales"]) == {"g128", "per-tensor"}
    methods = methods[methods["scales"] == "g128"]
    mse_row = methods[methods["range_method"] == "mse"].iloc[0]
    minmax_row = methods[methods["range_method"] == "minmax"].iloc[0]
    assert mse_row["mse"] <= minmax_row["mse"]
    # min-max on the full signed grid clips only what lies within the half step above +qmax (absmax -> +7.5 steps)
    assert 0 <= minmax_row["clipped_fraction"] < 0.01
    at.radio(key="c_scope").set_value("one block").run()
    assert not at.exception and len(at.get("plotly_chart")) == 3  # sweep, methods, block-scale fit


def test_size_page_computes_the_7b_arithmetic():
    at = open_page("size")
    n_variants = len(sizes.size_variants())
    this_model, reference = at.dataframe[0].value, at.dataframe[1].value
    assert len(this_model) == n_variants and len(reference) == 3 * n_variants
    seven_b = [m.value for m in at.markdown if m.value.startswith("**7B at INT4")]
    assert seven_b and "4.125 bits per quantized weight" in seven_b[0]
    assert any("full signed range" in c.value and "absmax / 7.5" in c.value for c in at.caption)
    assert len(at.get("plotly_chart")) == 2


def test_outliers_page_on_the_encoder_shows_real_activation_outliers():
    at = open_page("outliers", model=ENCODER)
    assert at.radio(key="o_source").value == "activations"  # the default once a calibration pass has run
    top = at.dataframe[0].value
    assert (top["source"] == "activation").all()
    # all-MiniLM-L6-v2 has genuine outlier channels: the largest is far above its layer's median.
    assert top["ratio_to_median"].iloc[0] > 10
    charts = at.get("plotly_chart")
    assert len(charts) == 3
    trace_names = {trace.get("name") for trace in json.loads(charts[1].proto.spec)["data"]}
    assert {"AWQ scales up (salient)", "SmoothQuant migrates"} <= trace_names


def test_outliers_page_reads_an_uploaded_safetensors_file(tmp_path):
    tensors = {f"model.layers.{i}.mlp.down_proj.weight": torch.randn(32, 64) for i in range(2)}
    tensors["model.layers.0.mlp.down_proj.weight"][:, 5] *= 40  # one outlier input channel
    save_file(tensors, tmp_path / "w.safetensors")
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    at.selectbox(key="sb_model").set_value("Upload .safetensors").run()
    at.file_uploader(key="sb_upload").set_value(("w.safetensors", (tmp_path / "w.safetensors").read_bytes(),
                                                 "application/octet-stream")).run()
    at.switch_page("pages/outliers_page.py").run()
    assert not at.exception
    top = at.dataframe[0].value
    assert top.iloc[0]["layer"] == "model.layers.0.mlp.down_proj.weight" and top.iloc[0]["channel"] == 5
    # The upload lives in this session's folder under a content hash, never under the name it came with.
    stored = Path(at.session_state["_model_choice"].weights_path)
    assert stored.parent == at.session_state["_quantlab_session_folder"].path and stored.name != "w.safetensors"


def test_session_folder_is_removed_with_its_session():
    folder = SessionFolder()
    path = folder.path
    (path / "upload.bin").write_bytes(b"weights")
    del folder  # what happens to a session's state when the session ends
    gc.collect()
    assert not path.exists()


def test_a_bad_upload_gives_a_message_not_a_traceback():
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    at.selectbox(key="sb_model").set_value("Upload .safetensors").run()
    at.file_uploader(key="sb_upload").set_value(("x.safetensors", b"\x89PNG\r\n\x1a\n not weights",
                                                 "application/octet-stream")).run()
    at.switch_page("pages/weights_page.py").run()
    assert not at.exception
    assert at.error and "safetensors" in at.error[0].value


def test_an_offline_hub_id_lists_the_offline_choices(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    at = open_page("model", model="Hugging Face hub id (needs network)", hub_id="gpt2")
    assert at.error and "bundled" in at.error[0].value


def test_quality_page_runs_a_small_sweep():
    at = open_page("quality")
    at.multiselect(key="q_configs").set_value(["fp", "int8", "int4-g128"])
    small_settings(at, "q")
    at.button(key="q_run").click().run()
    assert not at.exception
    table = at.dataframe[0].value
    assert list(table["config"]) == ["fp", "rtn-int8-per-channel", "rtn-int4-g128"]
    assert table["bits_per_weight"].iloc[2] == pytest.approx(4.125)
    kl = table["kl_divergence"].tolist()
    assert kl[0] == 0 and 0 < kl[1] < kl[2]
    assert table["pareto"].any() and len(at.get("plotly_chart")) == 3


def test_quality_page_opens_a_sweep_file(tmp_path):
    loaded = models.load_model(models.BUNDLED_LM)
    results = run_sweep(loaded, sweep_configs(["fp", "int4-g128"], CalibConfig(n_samples=2, seq_len=64)),
                        max_eval_tokens=512)
    path = write_record(tmp_path / "sweep.json", results, loaded).to_dict()
    at = open_page("quality")
    at.file_uploader(key="q_file").set_value(("sweep.json", json.dumps(path).encode(), "application/json")).run()
    assert not at.exception
    table = at.dataframe[0].value
    assert list(table["config"]) == ["fp", "rtn-int4-g128"]
    assert table["perplexity"].tolist() == pytest.approx([r.quality["perplexity"] for r in results])
    at.file_uploader(key="q_file").set_value(("bad.json", b"{not json", "application/json")).run()
    assert not at.exception and at.error


def test_quality_page_opens_the_shipped_sweep_without_computing():
    shipped = records.bundled_sweeps()
    assert "pystdlib-llama-4m-default" in shipped  # the workshop's instant example
    expected = records.read_record(shipped["pystdlib-llama-4m-default"])
    at = open_page("quality")
    at.selectbox(key="q_example").set_value("pystdlib-llama-4m-default")
    at.button(key="q_open_example").click().run()
    assert not at.exception
    table = at.dataframe[0].value
    assert len(table) == len(expected.runs) == 10
    assert table["perplexity"].tolist() == pytest.approx([r.quality["perplexity"] for r in expected.runs])
    assert len(at.get("plotly_chart")) == 3


def test_compare_page_puts_configurations_side_by_side():
    at = open_page("compare")
    at.multiselect(key="c_configs").set_value(["int8", "int4-g128"])
    small_settings(at, "c")
    at.button(key="c_run").click().run()
    assert not at.exception
    at.slider(key="c_tokens").set_value(8)
    at.toggle(key="c_generate").set_value(True).run()
    assert not at.exception
    summary = at.dataframe[0].value
    assert list(summary["config"]) == ["fp", "rtn-int8-per-channel", "rtn-int4-g128"]
    assert summary["size_mib"].iloc[2] < summary["size_mib"].iloc[1] < summary["size_mib"].iloc[0]
    generations = [c.value for c in at.code]
    assert len(generations) == 3 and all(g.startswith("def read_config(path):") for g in generations)
    assert at.get("plotly_chart")


def test_size_page_shows_the_gguf_references_as_sizes_only():
    at = open_page("size")
    here, scaled = at.dataframe[2].value, at.dataframe[3].value
    assert list(here["format"]) == ["gguf-Q8_0", "gguf-Q4_0", "gguf-Q4_K", "gguf-Q5_K", "gguf-Q6_K"]
    assert here["bits_per_weight"].tolist() == pytest.approx([8.5, 4.5, 4.5, 5.5, 6.5625])
    assert set(scaled["model"]) == {"7B", "70B"} and (scaled["note"].str.contains("quality not simulated")).all()
    assert any("quality not simulated" in m.value for m in at.markdown)


def test_mixed_precision_page_plans_under_the_budget_and_measures_the_plan():
    at = open_page("mixed")
    at.multiselect(key="m_candidates").set_value(["int8", "int4-g128"])
    at.select_slider(key="m_tokens").set_value(256)
    at.button(key="m_measure").click().run()
    assert not at.exception
    at.number_input(key="m_bpw").set_value(6.0).run()
    plan = at.dataframe[0].value
    assert len(plan) == 28 and set(plan["format"]) == {"int8-per-channel", "int4-g128"}
    assert 8 * plan["bytes"].sum() / plan["params"].sum() <= 6.0
    assert float(metrics(at)["Bits per weight"]) <= 6.0
    small_settings(at, "m")
    at.button(key="m_run").click().run()
    assert not at.exception
    comparison = at.dataframe[1].value
    assert list(comparison["kind"]) == ["plan", "uniform", "uniform"]
    assert comparison["bits_per_weight"].iloc[0] == pytest.approx(8 * plan["bytes"].sum() / plan["params"].sum())
    assert (comparison["measured_perplexity"] > 1).all() and comparison["measured_kl"].iloc[0] > 0
    assert len(at.get("plotly_chart")) == 2
