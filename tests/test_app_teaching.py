"""What a room sees: the sidebar shows only controls that act on the page, uploads keep the user's file name,
the Outliers page opens where the outliers are, and charts' labels are whole (issue 14)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import save
from streamlit.testing.v1 import AppTest

from pages.common import FORMAT_KEYS, UPLOAD_LABEL
from quantlab.analysis import plots
from quantlab.models import uploads
from tests.test_app_pages import APP, TIMEOUT


def sidebar_keys(at: AppTest) -> set[str]:
    widgets = [*at.sidebar.slider, *at.sidebar.selectbox, *at.sidebar.radio, *at.sidebar.number_input]
    return {w.key for w in widgets}


def test_the_format_panel_shows_only_where_it_acts_and_keeps_its_settings():
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert set(FORMAT_KEYS) <= sidebar_keys(at)  # Home: where a visit starts and the format is set
    at.slider(key="sb_bits").set_value(3).run()
    at.selectbox(key="sb_group").set_value(32).run()
    for page, uses in (("playground", "own bits, grid and group controls"), ("quality", "own list")):
        at.switch_page(f"pages/{page}_page.py").run()
        assert not at.exception, at.exception
        assert not set(FORMAT_KEYS) & sidebar_keys(at), page
        assert any(uses in c.value for c in at.sidebar.caption), [c.value for c in at.sidebar.caption]
        assert page != "playground" or at.slider(key="pg_bits")  # the Playground's own control is there
    at.switch_page("pages/weights_page.py").run()
    assert not at.exception, at.exception
    assert at.slider(key="sb_bits").value == 3 and at.selectbox(key="sb_group").value == 32
    assert at.session_state["_format"].name == "int3-g32"


def test_an_upload_error_names_the_file_the_user_uploaded():
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    at.selectbox(key="sb_model").set_value(UPLOAD_LABEL).run()
    at.file_uploader(key="sb_upload").set_value(("my-llama-shard.safetensors", b"\x89PNG\r\n\x1a\n not weights",
                                                 "application/octet-stream")).run()
    at.switch_page("pages/weights_page.py").run()
    assert not at.exception, at.exception
    messages = [e.value for e in at.error]
    assert any("my-llama-shard.safetensors is not a valid safetensors file" in m for m in messages), messages
    stored = Path(at.session_state["_model_choice"].weights_path).name
    assert stored.startswith("upload-") and not any(stored in m for m in messages)


def test_an_uploaded_name_is_shown_as_a_bare_printable_name():
    assert uploads.display_name("../../etc/x\x1b[31m.safetensors") == "x?[31m.safetensors"
    assert uploads.display_name("C:\\Users\\me\\model.safetensors") == "model.safetensors"
    assert len(uploads.display_name("a" * 500 + ".safetensors")) == uploads.MAX_NAME_CHARS
    stored = Path("/tmp/quantlab-uploads-1/session-x.y/upload-0123abcd.safetensors")
    message = f"{stored.name} is not a valid safetensors file; cannot open {stored}"
    assert uploads.in_user_terms(message, stored, "mine.safetensors") == (
        "mine.safetensors is not a valid safetensors file; cannot open mine.safetensors")


def outlier_file() -> bytes:
    """Two down projections; the outlier input channel (7) is in the second, so "first down layer" misses it."""
    weights = {f"model.layers.{i}.mlp.down_proj.weight": torch.randn(32, 128, generator=torch.Generator().manual_seed(i))
               for i in range(2)}
    weights["model.layers.1.mlp.down_proj.weight"][:, 7] *= 50
    return save(weights)


def test_the_outliers_page_takes_an_upload_and_opens_on_the_top_outliers_layer():
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    at.switch_page("pages/outliers_page.py").run()
    assert not at.exception, at.exception
    assert any(e.label == "Inspect your own checkpoint" for e in at.expander)
    at.file_uploader(key="o_upload").set_value(("shard-3.safetensors", outlier_file(),
                                                "application/octet-stream")).run()
    assert not at.exception, at.exception
    assert at.selectbox(key="sb_model").value == UPLOAD_LABEL
    top = at.dataframe[0].value
    assert top.iloc[0]["layer"] == "model.layers.1.mlp.down_proj.weight" and top.iloc[0]["channel"] == 7
    assert at.selectbox(key="o_layer").value == "model.layers.1.mlp.down_proj.weight"
    at.switch_page("pages/model_page.py").run()  # the upload is the session's model on every page
    assert not at.exception, at.exception
    assert any("shard-3.safetensors" in h.value for h in at.subheader)


def test_the_outliers_page_opens_on_the_top_outliers_layer_of_the_bundled_model():
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    at.switch_page("pages/outliers_page.py").run()
    assert not at.exception, at.exception
    top = at.dataframe[0].value
    assert at.selectbox(key="o_layer").value == top.iloc[0]["layer"]


def test_the_clipping_page_shows_what_percentile_clipping_changes():
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    at.switch_page("pages/clipping_page.py").run()
    assert not at.exception, at.exception
    methods = at.dataframe[0].value.set_index(["range_method", "scales"])
    per_tensor_minmax, per_tensor_pct = methods.loc[("minmax", "per-tensor")], methods.loc[("percentile 99.9", "per-tensor")]
    # One scale over the whole tensor: percentile clips its top 0.1 % and the error drops.
    assert per_tensor_pct["clipped_fraction"] > per_tensor_minmax["clipped_fraction"]
    assert per_tensor_pct["mse"] < 0.9 * per_tensor_minmax["mse"]
    # The default g128 groups: 0.1 % of 128 values is less than one, and the page says so.
    assert methods.loc[("percentile 99.9", "g128"), "mse"] == methods.loc[("minmax", "g128"), "mse"]
    assert any("less than one, so nothing is clipped" in c.value for c in at.caption)


def whole_labels(spec: dict, names: set[str]) -> None:
    """Horizontal bars, every name on the category axis in full, one row each, the margin grown to fit."""
    assert all(trace["orientation"] == "h" for trace in spec["data"])
    assert {label for trace in spec["data"] for label in trace["y"]} == names
    axis = spec["layout"]["yaxis"]
    assert axis["type"] == "category" and axis["dtick"] == 1 and axis["automargin"] is True
    assert spec["layout"]["height"] >= len(names) * plots.BAR_ROW_PX


def test_size_charts_label_every_format_in_full():
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    at.switch_page("pages/size_page.py").run()
    assert not at.exception, at.exception
    this_model, reference = (json.loads(chart.proto.spec) for chart in at.get("plotly_chart")[:2])
    sizes_table = at.dataframe[0].value
    whole_labels(this_model, set(sizes_table[sizes_table["note"] == ""]["format"]))
    whole_labels(reference, set(at.dataframe[1].value.query("model == '7B'")["format"]))


def test_the_sensitivity_chart_labels_every_layer_with_one_bar_each():
    layers = [f"model.layers.{b}.{part}" for b in range(12) for part in ("self_attn.q_proj", "mlp.down_proj")]
    table = pd.DataFrame({"layer": [plots.short_name(n) for n in layers], "percent": range(len(layers)),
                          "role": [n.split(".")[-1].removesuffix("_proj") for n in layers]})
    figure = plots.bar_figure(table, "layer", "percent", "sensitivity", color="role", horizontal=True)
    whole_labels(figure.to_plotly_json(), set(table["layer"]))
    assert figure.layout.barmode == "overlay"  # one role per layer: one centred bar, no empty slots
    assert figure.layout.height < 2 * len(layers) * plots.BAR_ROW_PX + 200
