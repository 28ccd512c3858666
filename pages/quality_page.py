"""Quality vs bits: run a sweep (or open one) and see quality against bits per weight and size."""


import streamlit as st

from pages.common import (
    cached_view, current_model, download_json, download_table, explain, progress_callback, results_key, run_warnings,
    user_errors,
)
from pages.runs import MAX_SWEEP_CONFIGS, quality_session, result_store, run_settings
from pages.tradeoff import (
    config_choices, run_configurations, show_answer, sidebar_format_name, tradeoff_charts, with_baseline,
)
from quantlab.analysis import plots
from quantlab.runs import records
from quantlab.analysis import runs as run_tables
from quantlab.numerics.formats import QuantFormat
from quantlab.runs.pipeline import DEFAULT_SWEEP

SENSITIVITY_FORMATS = ("int4-per-channel", "int4-g128", "int3-g128", "int2-g64")


@cached_view(max_entries=8)
def _open_record(data: bytes, name: str) -> records.RunRecord:
    return records.record_from_bytes(data, name)  # not JSON, too deep, NaN, "4.1" for a number: one DataError


def _sensitivity(key: str, fmt_name: str, eval_tokens: int, roles: tuple, session, progress):
    return result_store("sensitivity", 16).get(
        (key, fmt_name, eval_tokens, roles),
        lambda: run_tables.layer_sensitivity(session, QuantFormat.parse(fmt_name), list(roles), progress))


st.title("Quality vs bits")
st.write("Each configuration is a point: how many bits per weight it stores, and how much quality it keeps. "
         "The **Pareto front** joins the configurations that no other beats on both.")
explain("PTQ")
run_tab, open_tab = st.tabs(["Run a sweep", "Open a sweep file"])
with open_tab:
    bundled = records.bundled_sweeps()
    if bundled:
        left, right = st.columns([3, 1], vertical_alignment="bottom")
        example = left.selectbox("Measured sweep shipped with QuantLab", list(bundled), key="q_example",
                                 help="Computed once with `python -m quantlab sweep --out FILE.json`; opens instantly.")
        if right.button("Open this sweep", key="q_open_example"):
            with user_errors():
                record = _open_record(bundled[example].read_bytes(), bundled[example].name)
            st.session_state["q_runs"] = (f"file: {record.model.name}", record.runs)
    upload = st.file_uploader("Sweep file (JSON from `python -m quantlab sweep --out FILE.json`)", type=["json"],
                              key="q_file")
    if upload is not None:
        with user_errors():
            record = _open_record(upload.getvalue(), "the uploaded file")
        st.session_state["q_runs"] = (f"file: {record.model.name}", record.runs)
        st.success(f"Opened a {record.kind} of {len(record.runs)} runs on {record.model.name} "
                   f"({record.device}, QuantLab {record.quantlab_version}, {record.created}).")
loaded = current_model()
with run_tab:
    if loaded is None:
        st.info("Running a sweep needs a model that runs; choose one in the sidebar, or open a sweep file.")
    sidebar_format = sidebar_format_name()
    names = st.multiselect("Configurations", config_choices(DEFAULT_SWEEP, sidebar_format),
                           default=list(DEFAULT_SWEEP)[:MAX_SWEEP_CONFIGS], max_selections=MAX_SWEEP_CONFIGS,
                           accept_new_options=True, key="q_configs",
                           help="Type any name `python -m quantlab sweep --configs` takes, e.g. gptq-int4-g64, "
                                "awq-int3-g128, int4-g32-asym, w8a8-smoothquant.")
    st.caption(f"This page runs the configurations named here, not the sidebar's format"
               f"{f' (add it as `{sidebar_format}`)' if sidebar_format else ''}. Full precision (fp) is always run: "
               "it is the baseline every row is compared with.")
    settings = run_settings("q")
    if st.button("Run sweep", type="primary", key="q_run", disabled=not names or loaded is None):
        with user_errors():
            st.session_state["q_runs"] = (loaded.name, run_configurations(with_baseline(names), settings, loaded))

if "q_runs" not in st.session_state:
    st.info("Run a sweep or open a sweep file to see the trade-off.")
    st.stop()
label, results = st.session_state["q_runs"]
st.subheader(f"Results: {label}")
run_warnings(results)
metric = run_tables.quality_metric(results)
with user_errors():
    table, recommendation = show_answer(results, "q")
tradeoff_charts(table, metric, recommendation, "q")
download_table(table, "quality_sweep")
download_json([r.to_dict() for r in results], "quality_sweep_runs", "Download all runs (JSON)")

st.subheader("Per-layer sensitivity")
st.write("Quantize **one** layer at a time, leave the rest in full precision, and measure the quality drop: "
         "the tall bars are the layers to keep at higher precision.")
if loaded is None:
    st.info("Sensitivity needs a model that runs; choose one in the sidebar.")
    st.stop()
left, right = st.columns(2)
fmt_name = left.selectbox("Format for the one layer", SENSITIVITY_FORMATS, index=2, key="q_sens_fmt")
roles = run_tables.linear_roles(loaded.model)
chosen_roles = right.multiselect("Roles", roles, default=roles, key="q_sens_roles")
if st.button("Measure sensitivity", key="q_sens_run", disabled=not chosen_roles):
    session = quality_session(results_key(), settings.eval_tokens, loaded)
    with user_errors():
        st.session_state["q_sens"] = results_key(), _sensitivity(
            results_key(), fmt_name, settings.eval_tokens, tuple(chosen_roles), session, progress_callback())
if st.session_state.get("q_sens", (None,))[0] == results_key():
    sensitivity = st.session_state["q_sens"][1]
    st.plotly_chart(plots.bar_figure(sensitivity.assign(layer=[plots.short_name(n) for n in sensitivity["layer"]],
                                                        percent=sensitivity["relative_delta"] * 100),
                                     "layer", "percent", "Quality drop when only this layer is quantized",
                                     color="role", y_title=f"{metric} change (%)", horizontal=True),
                    key="q_sens_chart")
    st.dataframe(sensitivity, hide_index=True, width="stretch")
    download_table(sensitivity, "quality_layer_sensitivity")
