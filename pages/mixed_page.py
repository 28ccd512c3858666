"""Mixed precision: a format per layer under a size budget, planned from measured sensitivities, then run."""

import streamlit as st

from pages.common import (
    cached_view, download_table, progress_callback, require_model, results_key, run_warnings, user_errors,
)
from pages.runs import quality_session, result_store, run_settings
from quantlab.analysis import plan as planning
from quantlab.analysis import plots
from quantlab.analysis.planner import Budget
from quantlab.errors import FormatError

SENSITIVITY_TOKEN_CHOICES = (256, 512, 1024, 2048, 4096)
CANDIDATE_CHOICES = planning.DEFAULT_CANDIDATES + ("int4-g64", "int4-per-channel", "mxfp4", "int2-g64")


@cached_view(max_entries=8)
def _fitting(key: str, _loaded) -> list[str]:
    """The candidate formats that can store every linear of the model (group sizes must divide)."""
    fitting = []
    for name in CANDIDATE_CHOICES:
        try:
            planning.candidate_formats([name], _loaded)
        except FormatError:
            continue
        fitting.append(name)
    return fitting


def _sensitivity(key: str, names: tuple, tokens: int, loaded, progress) -> planning.Sensitivity:
    def compute():
        session = quality_session(key, tokens, loaded)
        return planning.measure_sensitivity(session, planning.candidate_formats(names, loaded), progress)

    return result_store("plan sensitivity", 8).get((key, names, tokens), compute)


def _measured(key: str, plan: planning.Plan, settings, loaded, progress) -> tuple:
    """The plan and each candidate on every layer, evaluated on the same windows."""
    def compute():
        session = quality_session(key, settings.eval_tokens, loaded)
        measured = planning.run_plan(session, plan, calib=settings.calib, progress=progress)
        uniform = planning.run_uniform(session, plan.sensitivity.candidates, calib=settings.calib, progress=progress)
        base = session.quality(loaded.model)[plan.sensitivity.metric]
        return measured, planning.comparison_table(plan, measured, uniform, base)

    layers = tuple((name, option.fmt_name) for name, option in plan.allocation.choices)
    return result_store("plan runs", 8).get((key, layers, settings), compute)


st.title("Mixed precision")
st.write("Give each linear the format it can afford. Quantize **one** linear at a time in each candidate format "
         "and measure how far the model moves from full precision (KL divergence per token); then choose the "
         "formats of least summed KL whose bytes fit the budget, counting codes, scales and zero-points exactly "
         "as the Size page does; then run the plan and see whether the prediction holds.")
st.caption("The plan assumes that the layers' divergences add up; the measured run tests it. It is the idea "
           "behind llama.cpp's per-tensor type mixes, with the sensitivities measured on this model. CLI: "
           "`python -m quantlab plan --budget-bpw 4.5`.")
loaded = require_model("A mixed-precision plan")
fitting = _fitting(results_key(), loaded)
left, right = st.columns([3, 1])
names = left.multiselect("Candidate formats", fitting, default=[n for n in planning.DEFAULT_CANDIDATES if n in fitting],
                         key="m_candidates", help="Each linear takes one of these; formats whose groups do not "
                                                  "divide every layer of this model are not offered.")
tokens = right.select_slider("Sensitivity tokens", SENSITIVITY_TOKEN_CHOICES, 512, key="m_tokens",
                             help="Evaluation tokens for each (linear, format) measurement.")
n_linears = len(loaded.structure.linears)
st.caption(f"{n_linears} linears x {len(names)} formats = **{n_linears * len(names)} evaluations** of "
           f"{tokens} tokens each.")
if st.button("Measure sensitivity", key="m_measure", disabled=not names):
    with user_errors():
        st.session_state["m_sens"] = (results_key(), tuple(names), tokens), _sensitivity(
            results_key(), tuple(names), tokens, loaded, progress_callback())
stored = st.session_state.get("m_sens")
if stored is None or stored[0][0] != results_key():
    st.info("Measure the sensitivities to plan.")
    st.stop()
sensitivity = stored[1]

st.subheader("The plan")
unit, value = st.columns([1, 2])
kind = unit.radio("Budget in", ("bits per weight", "MiB"), horizontal=True, key="m_budget_kind")
if kind == "bits per weight":
    amount = value.number_input("Bits per weight (quantized linears, scales included)", 1.0, 32.0, 4.5, 0.05,
                                key="m_bpw")
    budget_args = {"bits_per_weight": float(amount)}
else:
    amount = value.number_input("MiB for the whole model", 0.01, 2.0**24, 6.0, 0.1, key="m_mib")
    budget_args = {"mib": float(amount)}
with user_errors():
    plan = planning.make_plan(loaded, sensitivity, Budget(**budget_args))
table = plan.table()
left, mid, right = st.columns(3)
left.metric("Bits per weight", f"{plan.allocation.bits_per_weight:.3f}")
mid.metric("Model size", f"{plan.total_bytes / 2**20:.3f} MiB")
right.metric("Predicted KL" if sensitivity.metric == "perplexity" else "Predicted fidelity drop",
             f"{plan.allocation.predicted_loss:.4f}")
chart = table.assign(layer=[plots.short_name(n) for n in table["layer"]])
st.plotly_chart(plots.bar_figure(chart, "layer", "bits_per_weight", "Bits per weight chosen for each linear",
                                 color="format", y_title="bits per weight"), key="m_plan_chart")
st.dataframe(table, hide_index=True, width="stretch")
download_table(table, "mixed_precision_plan")

st.subheader("Measured")
settings = run_settings("m")
if st.button("Run the plan", type="primary", key="m_run"):
    with user_errors():
        st.session_state["m_result"] = (results_key(), plan.allocation.choices, settings), _measured(
            results_key(), plan, settings, loaded, progress_callback())
result = st.session_state.get("m_result")
if result is None or result[0] != (results_key(), plan.allocation.choices, settings):
    st.info("Run the plan to measure it next to the uniform formats.")
    st.stop()
measured, comparison = result[1]
run_warnings([measured])
metric = sensitivity.metric
st.write(f"The plan measured **{metric} {measured.quality.get(metric):.4f}** at {measured.bits_per_weight:.3f} "
         f"bits per weight; predicted {comparison[f'predicted_{metric}'].iloc[0]:.4f}.")
st.plotly_chart(plots.bar_figure(comparison, "config", f"measured_{metric}", f"Measured {metric}: the plan and "
                                 "each format on every layer", color="kind"), key="m_compare_chart")
st.dataframe(comparison, hide_index=True, width="stretch")
download_table(comparison, "mixed_precision_measured")
