"""Compare: two or three configurations side by side: size, quality, KL, per-layer error, generations."""

import streamlit as st

from pages.common import (
    cached_view, download_json, download_table, export_zip, progress_callback, require_model, results_key,
    run_warnings, user_errors,
)
from pages.runs import cached_quantized_model, run_settings
from pages.tradeoff import config_choices, run_configurations, show_answer, sidebar_format_name, with_baseline
from quantlab.analysis import plots
from quantlab.runs import records
from quantlab.analysis import runs as run_tables
from quantlab.runs.pipeline import DEFAULT_SWEEP

DEFAULT_CONFIGS = ["int8", "int4-g128", "int4-g64"]
PROMPTS = {"causal": "def read_config(path):\n", "encoder": ""}


@cached_view(max_entries=64)
def _generate(key: str, config_name: str, settings, prompt: str, n_tokens: int, _model, _tokenizer) -> str:
    return run_tables.generate_text(_model, _tokenizer, prompt, n_tokens)


@cached_view(max_entries=16)
def _record(key: str, names: tuple, settings, _results, _loaded) -> dict:
    return records.build_record(_results, _loaded, kind="sweep").to_dict()


def _models(key: str, names, settings, loaded) -> dict:
    """The quantized models themselves (generation and export need them; the figures above do not)."""
    bar = progress_callback()
    models = {}
    for index, name in enumerate(names):
        def step(fraction, message, index=index):
            bar((index + fraction) / len(names), f"[{index + 1}/{len(names)}] {message}")

        models[name] = cached_quantized_model(key, name, settings, loaded, step)
    bar(1.0, "models ready")
    return models


st.title("Compare")
st.write("Up to three configurations of the same model, side by side, against the baseline.")
loaded = require_model("Comparing configurations")
sidebar_format = sidebar_format_name()
choices = config_choices(sorted({*DEFAULT_SWEEP, *DEFAULT_CONFIGS} - {"fp"}), sidebar_format)
names = st.multiselect("Configurations", choices, default=DEFAULT_CONFIGS, max_selections=3, accept_new_options=True,
                       key="c_configs",
                       help="Type any name the CLI takes, e.g. gptq-int4-g64, awq-int3-g128, int4-g32-asym.")
st.caption(f"This page compares the configurations named here, not the sidebar's format"
           f"{f' (add it as `{sidebar_format}`)' if sidebar_format else ''}. Runs already made on Quality vs bits "
           "with the same model and settings are reused, not recomputed.")
settings = run_settings("c")
key = results_key()
if st.button("Compare", type="primary", key="c_run", disabled=not names):
    st.session_state["c_names"] = (key, tuple(names), settings)
if st.session_state.get("c_names", (None,))[0] != key:
    st.info("Pick configurations and press Compare.")
    st.stop()

_, names, settings = st.session_state["c_names"]
with user_errors():
    results = run_configurations(with_baseline(names), settings, loaded)
metric = run_tables.quality_metric(results)
run_warnings(results)
with user_errors():
    table, recommendation = show_answer(results, "c")

columns = st.columns(len(results))
for column, row in zip(columns, table.itertuples()):
    column.markdown(f"**{row.config}**" + (" (baseline)" if row.baseline else ""))
    column.metric("Size", f"{row.size_mib:.2f} MiB", None if row.baseline else f"{-row.size_saved_pct:+.1f} %",
                  delta_color="inverse")
    column.caption(f"{row.bits_per_weight:.3f} bits/weight")
    value, se = getattr(row, metric), getattr(row, f"{metric}_se")
    shown = f"{value:.4g} ± {se:.2g}" if se == se else f"{value:.4g}"
    change = None
    if not row.baseline:
        change = f"{row.delta_pct:+.2f} %" + (f" ± {row.delta_pct_se:.2f}" if row.delta_pct_se == row.delta_pct_se
                                                else "")
    column.metric(metric.capitalize(), shown, change,
                  delta_color="inverse" if run_tables.lower_is_better(metric) else "normal")
    if row.within_noise:
        column.caption("within noise: not distinguishable from the baseline at this many evaluation tokens")
    if row.kl_divergence is not None and row.kl_divergence == row.kl_divergence:
        column.metric("KL divergence", f"{row.kl_divergence:.4f}")
download_table(table, "compare_summary")
download_json(_record(key, names, settings, results, loaded), "compare_record", "Download the run record (JSON)")

st.subheader("Per-layer output error")
st.caption("Relative output error ||XWᵀ − XŴᵀ||² / ||XWᵀ||² of each linear on the calibration tokens.")
errors = run_tables.layer_errors(results)
st.plotly_chart(plots.bar_figure(errors.assign(layer=[plots.short_name(n) for n in errors["layer"]]), "layer",
                                 "output_error", "Output error per layer", color="config"), key="c_layers")
download_table(errors, "compare_layer_errors")

if loaded.kind == "causal" and loaded.tokenizer is not None:
    st.subheader("Generations from the same prompt")
    prompt = st.text_area("Prompt", PROMPTS["causal"], key="c_prompt")
    n_tokens = st.slider("New tokens", 8, 128, 32, key="c_tokens")
    if st.toggle("Generate from each configuration", key="c_generate",
                 help="Quantizes each configuration again to hold its model (the figures above are reused runs)."):
        with user_errors():
            models_by_name = {"fp": loaded.model, **_models(key, names, settings, loaded)}
        for column, (name, model) in zip(st.columns(len(models_by_name)), models_by_name.items()):
            with user_errors():
                text = _generate(key, name, settings, prompt, n_tokens, model, loaded.tokenizer)
            column.markdown(f"**{name}** (greedy)")
            column.code(prompt + text, language="python" if loaded.name.startswith("pystdlib") else None)

st.subheader("Export")
st.caption("A compressed-tensors pack-quantized checkpoint (the format vLLM and transformers load) of one "
           "weight-only configuration, zipped.")
export_name = st.selectbox("Configuration to export", names, key="c_export")
if st.button("Prepare the export", key="c_export_run"):
    with user_errors(), st.spinner("Packing…"):
        model = _models(key, [export_name], settings, loaded)[export_name]
        st.session_state["c_zip"] = (export_name, export_zip(model, loaded.tokenizer, export_name))
if "c_zip" in st.session_state and st.session_state["c_zip"][0] in names:
    name, data = st.session_state["c_zip"]
    st.download_button(f"Download {name} ({len(data) / 2**20:.1f} MiB zip)", data, f"quantlab-{name}.zip",
                       "application/zip", key="c_export_download")
