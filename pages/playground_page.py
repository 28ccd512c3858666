"""Playground: the quantization formulas made live on a vector you can edit. No model needed."""

import pandas as pd
import streamlit as st

from pages.common import GLOSSARY, cached_view, download_table, explain, user_errors
from quantlab.analysis import plots
from quantlab.analysis import blockformats, tensors
from quantlab.numerics.formats import Granularity, QuantFormat

DEFAULT_VALUES = [0.12, -0.53, 0.91, -0.07, 0.33, -1.2, 0.64, 0.05]


@cached_view(max_entries=128)
def _quantized(values: tuple, fmt_repr: str, grid_group: int, _fmt) -> tuple:
    result = tensors.quantize_vector(values, _fmt, grid_group)
    return result, plots.vector_figure(result), tensors.scale_steps(values, _fmt, grid_group)


@cached_view(max_entries=64)
def _both_ranges(values: tuple, fmt_repr: str, _fmt) -> tuple:
    results = tensors.compare_symmetric_ranges(values, _fmt)
    summary = tensors.range_summary(results, _fmt)
    figures = {row.grid: plots.vector_figure(results[row.grid], f"{row.grid} range, codes {row.codes}",
                                                  legend=False)
               for row in summary.itertuples()}
    return summary, figures


@cached_view(max_entries=64)
def _worked_block(values: tuple) -> tuple:
    return blockformats.worked_block(values)


@cached_view(max_entries=1)
def _code_tables() -> tuple:
    """The E2M1 codes and MXFP4's scale rounding: the same for every visitor, built once per process."""
    return blockformats.e2m1_table(), blockformats.mx_rounding_table()


st.title("Playground")
st.write("Quantization stores each number as a small integer **code** plus a shared **scale**. "
         "Edit the values, change the bits, and watch every step.")
explain("PTQ")

state = st.session_state
state.setdefault("pg_values", DEFAULT_VALUES)
state.setdefault("pg_version", 0)  # bumped when the values are replaced, so the editor starts afresh


def _replace_values(values: list[float]) -> None:
    state["pg_values"] = values
    state["pg_version"] += 1


def _fragment_run() -> bool:
    """Whether this run reruns only the fragment (a Playground control changed), not the whole page."""
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    return bool(ctx is not None and ctx.fragment_ids_this_run)


def _values_editor() -> list[float]:
    """The values: edited in a table or drawn from a distribution; returns what the table holds now."""
    mode = st.radio("Values", ("edit a vector", "draw from a distribution"), horizontal=True, key="pg_mode")
    if mode == "draw from a distribution":
        left, mid, right = st.columns(3)
        kind = left.selectbox("Distribution", tensors.DISTRIBUTIONS, index=1, key="pg_dist",
                              help="Trained weights look roughly Laplace: a sharp peak and heavy tails.")
        n = mid.number_input("How many", 4, 512, 64, step=4, key="pg_n")
        seed = right.number_input("Seed", 0, 10_000, 0, key="pg_seed")
        if st.button("Draw", key="pg_draw"):
            _replace_values(tensors.sample_distribution(kind, int(n), int(seed), spread=0.5).tolist())
    edited = st.data_editor(pd.DataFrame({"value": state["pg_values"]}), num_rows="dynamic", height=240,
                            key=f"pg_editor_{state['pg_version']}", width="stretch")
    values = [float(v) for v in edited["value"].dropna()]
    if values != state.get("pg_shown_values") and _fragment_run():
        st.rerun(scope="app")
    state["pg_shown_values"] = values
    add, reset = st.columns(2)
    if add.button("Add an outlier (appends 10 × max |x|)", key="pg_outlier", width="stretch"):
        with user_errors():
            _replace_values(tensors.with_outlier(values))
        st.rerun()
    if reset.button("Reset to the example", key="pg_reset", width="stretch"):
        _replace_values(DEFAULT_VALUES)
        st.rerun()
    return values


def _format_controls(values: list[float]) -> tuple[QuantFormat, int]:
    """The grid's controls; returns the format and the number of groups the values split into."""
    bits = st.slider("Bits", 2, 8, 4, key="pg_bits")
    symmetric = st.radio("Grid", ("symmetric", "asymmetric"), horizontal=True, key="pg_sym") == "symmetric"
    explain("zero-point")
    symmetric_range = st.radio("Symmetric range", ("full", "restricted"), horizontal=True, key="pg_range",
                               disabled=not symmetric,
                               help="full (the default): codes -8..7 at 4 bits and s = max|x| / 7.5, as compressed-"
                                    "tensors, llm-compressor and GPTQ quantize; restricted: codes -7..7, s = max|x| / 7.")
    sizes = tensors.playground_group_sizes(len(values))
    per_group = st.radio("Scale shared by", ("the whole vector", "groups"), horizontal=True, key="pg_gran",
                         disabled=not sizes) == "groups"
    group_size = st.selectbox("Group size", sizes or [len(values)], key="pg_group", disabled=not per_group)
    explain("group size")
    scale_dtype = st.radio("Scale stored as", ("fp16", "fp32"), horizontal=True, key="pg_scale_dtype",
                           help="Real checkpoints store scales in fp16, which rounds them to ~3 significant "
                                "digits; fp32 removes that rounding.")
    grouped = per_group and bool(sizes)
    with user_errors():
        fmt = QuantFormat(n_bits=bits, symmetric=symmetric,
                          granularity=Granularity("group", group_size) if grouped else Granularity("tensor"),
                          scale_dtype=scale_dtype, symmetric_range=symmetric_range if symmetric else "full")
    return fmt, len(values) // group_size if grouped else 1


def _shown_group(values: list[float], fmt: QuantFormat, n_groups: int, where) -> int:
    """Which group the chart and the formulas show: the one with the largest |x| unless one is chosen."""
    if n_groups <= 1:
        return 0
    largest = tensors.largest_group(values, fmt)
    choice = where.selectbox("Chart and formulas for", ["the group with the largest |x|",
                                                        *[f"group {g}" for g in range(n_groups)]],
                             key="pg_grid_group")
    return largest if choice.startswith("the group") else int(choice.split()[1])


def _formulas(fmt: QuantFormat, steps, result, where: str) -> None:
    """The scale (and zero-point) formulas, then the same with this group's numbers."""
    shown = result.groups.iloc[steps.group]
    st.subheader("The formulas, with your numbers" + where)
    if fmt.symmetric:
        low = r"-(2^{b-1}-1)" if fmt.restricted else r"-2^{b-1}"
        divisor = r"2^{b-1}-1" if fmt.restricted else r"(2^{b}-1)/2"
        st.latex(rf"s = \frac{{\max |x|}}{{{divisor}}} \qquad q = \mathrm{{clamp}}\left(\mathrm{{round}}\left(\frac{{x}}{{s}}"
                 rf"\right), {low},\ 2^{{b-1}}-1\right) \qquad \hat{{x}} = s \cdot q")
        st.latex(rf"s = \frac{{{steps.high:.4g}}}{{{steps.levels:g}}} = {steps.stored_scale:.5g}"
                 rf"\qquad q \in [{fmt.qmin}, {fmt.qmax}]")
    else:
        st.latex(r"s = \frac{\max x - \min x}{2^{b}-1} \qquad z = \mathrm{round}\left(-\frac{\min x}{s}\right) \qquad "
                 r"q = \mathrm{clamp}\left(\mathrm{round}\left(\frac{x}{s}\right) + z,\ 0,\ 2^{b}-1\right) \qquad "
                 r"\hat{x} = s\,(q - z)")
        st.latex(rf"s = \frac{{{steps.high:.4g} - ({steps.low:.4g})}}{{{steps.levels}}} = {steps.stored_scale:.5g} \qquad "
                 rf"z = \mathrm{{round}}\left(\frac{{{-steps.low:.4g}}}{{{steps.stored_scale:.5g}}}\right) = "
                 rf"{steps.zero_point} \qquad q \in [{fmt.qmin}, {fmt.qmax}]")
    if steps.rounded:
        st.caption(f"The exact division gives {steps.exact_scale:.7g}; the scale is stored in {fmt.scale_dtype}, which "
                   f"keeps about 3 significant digits, so {steps.stored_scale:.5g} ({fmt.scale_dtype} of "
                   f"{steps.exact_scale:.7g}) is what every code is computed with. Store it as fp32 (right) to remove "
                   "that rounding.")
    st.caption(f"**Scale**: {GLOSSARY['scale']} With {len(result.groups)} scale(s); this group's grid spans "
               f"[{shown['lowest']:.4g}, {shown['highest']:.4g}].")


def _results(fmt: QuantFormat, result, figure, steps, where: str) -> None:
    """The headline numbers, the chart and the two tables (every value, every group)."""
    shown = result.groups.iloc[steps.group]
    metrics = st.columns(4)
    metrics[0].metric("Scale" + where, f"{shown['scale']:.4g}")
    metrics[1].metric("Zero-point", int(shown["zero_point"]) if not fmt.symmetric else "none")
    metrics[2].metric("Mean squared error", f"{result.report.mse:.3g}")
    metrics[3].metric("Values clipped", int(result.table["clipped"].sum()))
    st.plotly_chart(figure, key="pg_chart")

    st.subheader("Every value, step by step")
    st.caption("scaled = x / s (+ z) before rounding; code = the stored integer; dequantized = what the model computes "
               "with; error = dequantized - x.")
    st.dataframe(result.table, hide_index=True, width="stretch")
    download_table(result.table, "playground_values")
    st.caption("One row per group: its scale, zero-point and the range its grid covers.")
    st.dataframe(result.groups, hide_index=True, width="stretch")
    download_table(result.groups, "playground_groups")


def _range_comparison(values: list[float], fmt: QuantFormat) -> None:
    """A symmetric grid on the full and on the restricted range, side by side."""
    bits = fmt.n_bits
    st.subheader("Full or restricted range: the extra level")
    summary, range_figures = _both_ranges(tuple(values), repr(fmt), fmt)
    st.caption(f"The same values on both symmetric grids. The full range [{-2 ** (bits - 1)}, {2 ** (bits - 1) - 1}] "
               "is what compressed-tensors, llm-compressor, GPTQ and vLLM use: its step is max|x| / "
               f"{2 ** bits / 2 - 0.5:g} instead of / {2 ** (bits - 1) - 1}, finer for every value, and the most "
               "negative value can use the extra code; the price is that a positive max|x| lands on "
               f"{2 ** bits / 2 - 0.5:g} steps and is clipped to {2 ** (bits - 1) - 1}, half a step short. "
               "Symbols as in the chart above.")
    for column, (grid, range_figure) in zip(st.columns(2), range_figures.items()):
        column.plotly_chart(range_figure, key=f"pg_range_chart_{grid}")
    st.dataframe(summary, hide_index=True, width="stretch")


@st.fragment
def interactive() -> None:
    """The values, the controls and everything computed from both.

    A fragment: a step of a control reruns this part only, not the sidebar and not the model-independent
    sections below (bench/bench_pages.py times the steps). When the values change here (an edit, a draw),
    the page reruns whole, so that the block formats below follow them.
    """
    source, controls = st.columns([3, 2])
    with source:
        values = _values_editor()
    with controls:
        fmt, n_groups = _format_controls(values)
    with user_errors():
        shown_group = _shown_group(values, fmt, n_groups, controls)
        result, figure, steps = _quantized(tuple(values), repr(fmt), shown_group, fmt)
    where = f" (group {steps.group})" if n_groups > 1 else ""
    _formulas(fmt, steps, result, where)
    _results(fmt, result, figure, steps, where)
    if fmt.symmetric:
        _range_comparison(values, fmt)


interactive()

with st.expander("Clipping and outliers"):
    st.write(GLOSSARY["outlier"].capitalize() + ". Press *Add an outlier*: the scale grows with the largest value, "
             "so every other value lands on a coarser grid and the error of the whole vector rises. "
             "Per-group scales confine the damage to the outlier's group.")
    st.write(GLOSSARY["clipping"].capitalize() + ".")
with st.expander("PTQ and QAT: when is quantization done?"):
    st.write("**Post-training quantization (PTQ)**, what QuantLab does, converts a trained model directly: "
             "round-to-nearest needs only the weights; GPTQ and AWQ also use a few calibration examples to "
             "choose better codes. Minutes, no training.")
    st.write("**Quantization-aware training (QAT)** simulates the rounding during training (fake-quantize in "
             "the forward pass, a straight-through gradient in the backward pass), so the model learns weights "
             "that survive it. Better at 2-3 bits, but it needs the training data and compute.")

st.subheader("The 2026 block formats: MXFP4 and NVFP4 on your values")
st.write("FP4 (**E2M1**) stores a sign, 2 exponent bits and 1 mantissa bit: eight magnitudes, "
         "0, 0.5, 1, 1.5, 2, 3, 4, 6, so the grid is fine near zero and coarse near the top. "
         "Rounding is to the nearest value, ties to the even mantissa (2.5 → 2, 3.5 → 4, 5 → 4); above 6 it saturates.")
with user_errors():
    block_table, block_summary = _worked_block(tuple(state["pg_shown_values"]))
left, right = st.columns(2)
left.caption("The 16 E2M1 codes")
e2m1_codes, mx_rounding = _code_tables()
left.dataframe(e2m1_codes, hide_index=True, height=300, width="stretch")
right.caption("MXFP4's E8M0 scale: the block's absmax rounded to a power of two 2^e (up from 1.75·2^e on), "
              "then s = 2^(e-2), so that the top code 6·s lands near the absmax.")
right.dataframe(mx_rounding, hide_index=True, width="stretch")
st.write("**MXFP4** (one E8M0 power-of-two scale per 32 values, 4.25 bits per weight) can only pick s among powers "
         "of two: the grid's top 6·s overshoots the absmax by up to 1.7x (range wasted), or the absmax exceeds it "
         "by up to 1/6 (the largest values clip). **NVFP4** (one FP8 E4M3 scale per 16 values, plus one fp32 scale per "
         "tensor, 4.5 bits) stores s with 3 mantissa bits, so 6·s sits within 1/16 of the absmax, and its blocks "
         "are half as long, so an outlier coarsens fewer neighbours. Your values, as the first block of each:")
st.dataframe(block_summary, hide_index=True, width="stretch")
st.dataframe(block_table, hide_index=True, width="stretch")
download_table(block_table, "playground_block_formats")
