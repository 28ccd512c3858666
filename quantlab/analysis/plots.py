"""Plotly figures of ``quantlab.analysis`` results. No Streamlit here: the pages only display them.

Each function takes the DataFrame or array an analysis function returns and gives back a
``plotly.graph_objects.Figure`` with labelled axes, so the same figure serves the app and reports.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from quantlab.analysis.tensors import VectorQuantization

PALETTE = ("#3b5bdb", "#e8590c", "#2b8a3e", "#ae3ec9", "#c92a2a", "#1098ad", "#f08c00", "#5c940d")
MAX_LEVEL_LINES = 64  # above this many grid levels (INT8, FP8) draw ticks, not lines: they would fill the plot


def _layout(fig: go.Figure, title: str, x: str, y: str, height: int = 360) -> go.Figure:
    """Shared look, readable on a projector: 14 px text, plain numbers (no "800μ" or "10k" SI suffixes)."""
    fig.update_layout(
        title=title, xaxis_title=x, yaxis_title=y, height=height, template="plotly_white",
        margin=dict(l=70, r=20, t=50, b=50), legend=dict(orientation="h", y=-0.2), font=dict(size=14),
    )
    fig.update_xaxes(exponentformat="power", automargin=True)
    fig.update_yaxes(exponentformat="power", automargin=True)
    return fig


def _vertical_lines(xs: Sequence[float], y_top: float) -> tuple[list, list]:
    """One scatter trace's coordinates for many vertical segments (None breaks the line)."""
    px, py = [], []
    for x in xs:
        px += [x, x, None]
        py += [0, y_top, None]
    return px, py


def vector_figure(vq: VectorQuantization, title: str | None = None, legend: bool = True) -> go.Figure:
    """Each value and where it lands on the grid; clipped values ringed in red, grid levels as grey lines.

    Fixed margins, the legend (``legend``) above the plot: the Playground redraws this figure at every step of
    a control, and a margin that grows to fit the ticks or the legend makes plotly lay the figure out again,
    most of the browser's time per step (bench/bench_pages.py, CPU seconds of the browser).
    """
    table = vq.table
    lo, hi = float(min(table["value"].min(), vq.levels.min())), float(max(table["value"].max(), vq.levels.max()))
    levels = vq.levels if len(vq.levels) <= MAX_LEVEL_LINES else vq.levels[(vq.levels >= lo) & (vq.levels <= hi)]
    levels = levels[:: max(1, len(levels) // MAX_LEVEL_LINES)]
    index = np.arange(len(table))
    # One trace of horizontal segments (None breaks the line): add_hline per level costs ~15 ms each.
    gx, gy = [], []
    for level in levels:
        gx += [-0.5, len(table) - 0.5, None]
        gy += [float(level), float(level), None]
    fig = go.Figure([
        go.Scatter(x=gx, y=gy, mode="lines", name="grid levels", line=dict(color="#ced4da", width=1),
                   hoverinfo="skip"),
        go.Scatter(x=index, y=table["value"], mode="markers", name="original x", marker=dict(size=11, color=PALETTE[0])),
        go.Scatter(x=index, y=table["dequantized"], mode="markers", name="dequantized x̂",
                   marker=dict(size=11, symbol="x", color=PALETTE[1])),
    ])
    clipped = table[table["clipped"]]
    if len(clipped):
        fig.add_trace(go.Scatter(x=clipped.index, y=clipped["value"], mode="markers", name="clipped",
                                 marker=dict(size=18, symbol="circle-open", color=PALETTE[4], line=dict(width=2))))
    n_groups = int(table["group"].max()) + 1
    if title is None:
        title = "Values and their grid" if n_groups == 1 else f"Values and the grid of group {vq.grid_group}"
    if n_groups > 1:  # shade the group whose grid is drawn: the other groups have grids of their own
        members = table.index[table["group"] == vq.grid_group]
        fig.add_vrect(x0=members.min() - 0.5, x1=members.max() + 0.5, fillcolor="#fff3bf", opacity=0.5,
                      line_width=0, layer="below")
    _layout(fig, title, "value index", "value")
    fig.update_xaxes(automargin=False)
    fig.update_yaxes(automargin=False)
    return fig.update_layout(showlegend=legend, margin=dict(l=80, r=20, t=80 if legend else 50, b=50, autoexpand=False),
                             legend=dict(orientation="h", x=1, xanchor="right", y=1.02, yanchor="bottom"))


def histogram_figure(hist: pd.DataFrame, title: str, x_title: str, levels: np.ndarray | None = None,
                     log_y: bool = False) -> go.Figure:
    """A histogram (from ``analysis.histogram``) with optional quantization levels overlaid."""
    fig = go.Figure(go.Bar(x=hist["center"], y=hist["count"], width=(hist["right"] - hist["left"]),
                           name="count", marker_color=PALETTE[0], opacity=0.85))
    if levels is not None and len(levels):
        top = float(hist["count"].max() or 1)
        px, py = _vertical_lines([float(v) for v in levels], top)
        fig.add_trace(go.Scatter(x=px, y=py, mode="lines", name=f"grid levels ({len(levels)})",
                                 line=dict(color=PALETTE[1], width=1)))
    fig.update_yaxes(type="log" if log_y else "linear")
    return _layout(fig, title, x_title, "count")


def overlaid_histograms_figure(hists: dict[str, pd.DataFrame], title: str, x_title: str,
                               y_title: str = "count") -> go.Figure:
    """Several histograms (or per-channel profiles) on one axis as outlines (e.g. the error of two formats)."""
    fig = go.Figure()
    for i, (name, hist) in enumerate(hists.items()):
        fig.add_trace(go.Scatter(x=hist["center"], y=hist["count"], mode="lines", name=name,
                                 line=dict(shape="hvh", color=PALETTE[i % len(PALETTE)], width=2)))
    return _layout(fig, title, x_title, y_title)


def clipping_figure(sweep: pd.DataFrame, best: pd.Series) -> go.Figure:
    """MSE against clip ratio, split into rounding and clipping, with the minimum marked."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    for column, name, color in (("mse", "total MSE", PALETTE[0]), ("rounding_mse", "rounding part", PALETTE[2]),
                                ("clipping_mse", "clipping part", PALETTE[4])):
        fig.add_trace(go.Scatter(x=sweep["clip_ratio"], y=sweep[column], name=name, mode="lines",
                                 line=dict(color=color, width=3 if column == "mse" else 2)), secondary_y=False)
    fig.add_trace(go.Scatter(x=sweep["clip_ratio"], y=sweep["clipped_fraction"] * 100, name="% clipped",
                             mode="lines", line=dict(color="#868e96", dash="dot")), secondary_y=True)
    fig.add_trace(go.Scatter(x=[best["clip_ratio"]], y=[best["mse"]], mode="markers+text", name="minimum",
                             text=[f"min at {best['clip_ratio']:.2f}"], textposition="top center",
                             marker=dict(size=14, color=PALETTE[1], symbol="star")), secondary_y=False)
    # Whole-percent ticks of its own (no "4.87, 9.74" steps borrowed from the MSE axis), no second grid.
    fig.update_yaxes(title_text="% of values clipped", secondary_y=True, showgrid=False, rangemode="tozero",
                     tickformat=".0f", ticksuffix=" %", tickmode="auto", nticks=6)
    return _layout(fig, "Error against clipping ratio (1.0 = min-max, no clipping)", "clip ratio", "mean squared error")


def error_split_figure(table: pd.DataFrame, label_column: str) -> go.Figure:
    """Stacked bars: each row's MSE as its rounding part plus its clipping part."""
    fig = go.Figure([
        go.Bar(x=table[label_column], y=table["rounding_mse"], name="rounding", marker_color=PALETTE[2]),
        go.Bar(x=table[label_column], y=table["clipping_mse"], name="clipping", marker_color=PALETTE[4]),
    ])
    fig.update_layout(barmode="stack")
    return _layout(fig, "Where the error comes from", label_column.replace("_", " "), "mean squared error")


BAR_ROW_PX = 16  # height of one horizontal bar: 14 px labels, one per row, none skipped


def bar_figure(table: pd.DataFrame, x: str, y: str, title: str, color: str | None = None,
               y_title: str | None = None, horizontal: bool = False) -> go.Figure:
    """A plain or grouped bar chart of one column against another.

    ``horizontal``: the ``x`` labels (format or layer names) run down the left, each in full on its own row,
    and the chart grows with their number; a vertical chart tilts long names and shows only every other one
    when they crowd.
    """
    fig = go.Figure()
    groups = [(None, table)] if color is None else list(table.groupby(color, sort=False))
    for i, (name, part) in enumerate(groups):
        values = dict(y=part[x], x=part[y], orientation="h") if horizontal else dict(x=part[x], y=part[y])
        fig.add_trace(go.Bar(**values, name=str(name) if name is not None else y,
                             marker_color=PALETTE[i % len(PALETTE)]))
    # Side by side where a label has a bar per colour (sizes per variant); one centred bar where each label
    # has one colour only (layers coloured by their role).
    slots = 1 if color is None else int(table.groupby(x, sort=False)[color].nunique().max())
    fig.update_layout(barmode="group" if slots > 1 else "overlay", showlegend=color is not None)
    if not horizontal:
        return _layout(fig, title, x.replace("_", " "), y_title or y.replace("_", " "))
    rows = table[x].nunique()
    _layout(fig, title, y_title or y.replace("_", " "), "", height=max(300, rows * BAR_ROW_PX * slots + 160))
    # Every category labelled (dtick 1), top to bottom in the table's order, the margin as wide as the longest.
    fig.update_yaxes(type="category", dtick=1, autorange="reversed", automargin=True)
    fig.update_layout(legend=dict(orientation="h", x=0, y=1, yanchor="bottom"), margin=dict(t=90))
    return fig


def heatmap_figure(z: np.ndarray, labels: Sequence[str], title: str, x_title: str, log_color: bool = True) -> go.Figure:
    """Layers (rows) by channels (columns); a log colour scale keeps both outliers and the bulk readable."""
    # float32 halves what the browser receives (plotly sends numpy arrays as typed binary), and the
    # Outliers page's page-switch time is mostly the browser decoding and drawing this heatmap.
    values = (np.log10(np.maximum(z, 1e-12)) if log_color else z).astype(np.float32)
    fig = go.Figure(go.Heatmap(
        z=values, y=[short_name(name) for name in labels], colorscale="Viridis", customdata=z.astype(np.float32),
        hovertemplate="%{y}<br>channel %{x}<br>value %{customdata:.4g}<extra></extra>",
        colorbar=dict(title="log10" if log_color else "value"),
    ))
    return _layout(fig, title, x_title, "", height=max(300, 22 * len(labels) + 120))


def short_name(name: str) -> str:
    """``model.layers.3.mlp.down_proj`` -> ``3.mlp.down_proj``: block index and local name."""
    parts = name.removesuffix(".weight").split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[digits[0]:]) if digits else name


def channel_figure(table: pd.DataFrame, column: str, title: str, marks: dict[str, str] | None = None) -> go.Figure:
    """One layer's channels as bars; boolean columns in ``marks`` (column -> legend label) get symbols on top."""
    fig = go.Figure(go.Bar(x=table["channel"], y=table[column], name=column.replace("_", " "),
                           marker_color=PALETTE[0]))
    for i, (flag, label) in enumerate((marks or {}).items()):
        chosen = table[table[flag]]
        fig.add_trace(go.Scatter(x=chosen["channel"], y=chosen[column] * (1.06 + 0.08 * i), mode="markers",
                                 name=label, marker=dict(size=10, symbol="triangle-down", color=PALETTE[1 + i])))
    return _layout(fig, title, "channel", column.replace("_", " "))


BIT_TICKS = (2, 3, 4, 5, 6, 8, 12, 16, 32)  # on a log axis, plotly's own ticks would read "2, 3" for 20, 30
# Fixed, clearly distinct colours per method (Okabe-Ito, colour-blind safe): a method keeps its colour on
# every chart, whichever methods a sweep happens to contain.
METHOD_COLORS = {"fp": "#000000", "rtn": "#0072B2", "gptq": "#D55E00", "awq": "#009E73", "smoothquant": "#CC79A7"}
SYMBOLS = ("circle", "square", "diamond", "triangle-up", "triangle-down", "pentagon", "hexagon", "star", "cross", "x")
AXIS_TITLES = {"bits_per_weight": "bits per weight", "size_mib": "size (MiB)", "kl_divergence": "KL divergence (nats)",
               "perplexity": "perplexity", "fidelity": "fidelity (mean cosine)"}
# Label placement works in pixels of the plot area. tradeoff_figure fixes its height and margins (the legend in
# a fixed right margin, margins never grow); its width follows the page, and labels are placed for the
# narrowest plot area expected (a full-width chart on a 1024 px screen): wider only spreads them further apart.
# A 11 px font is ~6.5 px a character and 15 px a line. Spots around a point, in order: above, below, right,
# left, corners.
TRADEOFF_HEIGHT = 460
TRADEOFF_MARGIN = dict(l=70, r=250, t=50, b=60, autoexpand=False)  # the right margin: one configuration a line
PLOT_PX = (420.0, 0.95 * (TRADEOFF_HEIGHT - 50 - 60))
CHAR_PX, LINE_PX, MARKER_PX = 6.5, 15.0, 14.0
LABEL_SPOTS = ((0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (-1, 1), (1, -1), (-1, -1))


def axis_title(column: str) -> str:
    return AXIS_TITLES.get(column, column.replace("_", " "))


def _symbols(table: pd.DataFrame) -> list[str]:
    """A marker symbol per row, distinct among the rows of one method (int4-g64 vs int4-g128 at a glance)."""
    seen: dict[str, int] = {}
    out = []
    for method in table["method"]:
        out.append(SYMBOLS[seen.get(method, 0) % len(SYMBOLS)])
        seen[method] = seen.get(method, 0) + 1
    return out


def _to_pixels(values: np.ndarray, log: bool, size: float) -> np.ndarray:
    v = np.log10(values) if log else values
    low, high = np.nanmin(v), np.nanmax(v)
    span = (high - low) or 1.0
    return (v - low) / span * size * 0.84 + size * 0.08  # plotly pads the autorange by a few per cent


def place_labels(xs: Sequence[float], ys: Sequence[float], texts: Sequence[str], log_x: bool = True,
                 log_y: bool = False) -> list[tuple[float, float] | None]:
    """A pixel offset (dx, dy) per label, so that no label overlaps another label or a marker; None: no room.

    Greedy, in the order given: each label takes the first spot around its point that is free.
    """
    px = _to_pixels(np.asarray(xs, dtype=float), log_x, PLOT_PX[0])
    py = _to_pixels(np.asarray(ys, dtype=float), log_y, PLOT_PX[1])
    half = MARKER_PX / 2
    taken = [(x - half, y - half, x + half, y + half) for x, y in zip(px, py)]  # markers
    offsets: list[tuple[float, float] | None] = []
    for x, y, text in zip(px, py, texts):
        width, height = CHAR_PX * len(text) + 4, LINE_PX
        for sx, sy in LABEL_SPOTS:
            dx = sx * (half + width / 2 + 2)
            dy = sy * (half + height / 2 + 1)
            box = (x + dx - width / 2, y + dy - height / 2, x + dx + width / 2, y + dy + height / 2)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in taken):
                taken.append(box)
                offsets.append((dx, dy))
                break
        else:
            offsets.append(None)
    return offsets


def tradeoff_figure(table: pd.DataFrame, x: str, y: str, title: str, front: str | None = "pareto",
                    log_y: bool = False, error: str | None = None, highlight: str | None = None) -> go.Figure:
    """Configurations as points, each its own legend entry, coloured by method; the Pareto front as a line.

    Every point is named twice: in the legend (colour = method, symbol = which configuration of that method)
    and by a label placed where it overlaps no other label or marker (a point with no free spot keeps only its
    legend entry and hover). ``error`` names a column of standard errors drawn as error bars; ``highlight``
    rings one configuration (the recommendation). The x axis is logarithmic: 3, 4, 8 and 32 bits spread
    evenly instead of everything below 8 bits sharing a tenth of the width.
    """
    table = table.reset_index(drop=True)
    fig = go.Figure()
    on_front = table[front] if front is not None and table[front].any() else pd.Series(False, index=table.index)
    for row, symbol in zip(table.itertuples(index=False), _symbols(table)):
        se = getattr(row, error) if error else None
        fig.add_trace(go.Scatter(
            x=[getattr(row, x)], y=[getattr(row, y)], mode="markers", name=row.config, legendgroup=row.method,
            marker=dict(size=12, symbol=symbol, color=METHOD_COLORS.get(row.method, "#868e96"),
                        line=dict(width=1, color="white")),
            error_y=dict(type="data", array=[se], visible=True, thickness=1.5) if se is not None and se == se else None,
            customdata=[row.config], cliponaxis=False,
            hovertemplate=f"%{{customdata}} ({row.method})<br>{axis_title(x)} %{{x:.4g}}<br>{axis_title(y)} "
                          f"%{{y:.4g}}<extra></extra>",
        ))
    if highlight is not None and (table["config"] == highlight).any():
        chosen = table[table["config"] == highlight]
        fig.add_trace(go.Scatter(x=chosen[x], y=chosen[y], mode="markers", name="recommended",
                                 marker=dict(size=24, symbol="circle-open", color="#f08c00", line=dict(width=3)),
                                 hoverinfo="skip"))
    if on_front.any():
        best = table[on_front].sort_values(x)
        fig.add_trace(go.Scatter(x=best[x], y=best[y], mode="lines", name="Pareto front",
                                 line=dict(color="#495057", dash="dash"), hoverinfo="skip"))
    _annotate(fig, table, x, y, log_y)
    fig.update_yaxes(type="log" if log_y else "linear", tickformat=".4~g")
    fig.update_xaxes(type="log", tickvals=BIT_TICKS if x == "bits_per_weight" else _log_ticks(table[x]),
                     tickformat=".4~g")
    fig = _layout(fig, title, axis_title(x), axis_title(y), height=TRADEOFF_HEIGHT)
    fig.update_layout(margin=TRADEOFF_MARGIN,
                      legend=dict(orientation="v", x=1.02, y=1, font=dict(size=11)))
    fig.update_xaxes(automargin=False)
    fig.update_yaxes(automargin=False)  # a margin that grows would shrink the area the labels were placed in
    return fig


def _annotate(fig: go.Figure, table: pd.DataFrame, x: str, y: str, log_y: bool) -> None:
    """Name every point that has room, front points first (they are the ones people read)."""
    order = table.sort_values("pareto" if "pareto" in table else x, ascending=False).index
    offsets = place_labels(table.loc[order, x], table.loc[order, y], list(table.loc[order, "config"]),
                           log_x=True, log_y=log_y)
    for index, offset in zip(order, offsets):
        if offset is None:
            continue
        value_x, value_y = table.at[index, x], table.at[index, y]
        fig.add_annotation(x=np.log10(value_x), y=np.log10(value_y) if log_y else value_y,  # log axes: log10
                           text=table.at[index, "config"], showarrow=False, xshift=offset[0], yshift=offset[1],
                           font=dict(size=11, color=METHOD_COLORS.get(table.at[index, "method"], "#495057")))


def _log_ticks(values: pd.Series) -> list[float]:
    """1-2-5 ticks across the values' range, so a log axis reads "2, 5, 10, 20" and not "10k, 5, 2, 1000"."""
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    ticks = [m * 10.0**e for e in range(int(np.floor(np.log10(low))) - 1, int(np.ceil(np.log10(high))) + 1)
             for m in (1, 2, 5)]
    inside = [t for t in ticks if low / 1.5 <= t <= high * 1.5]
    return inside if len(inside) >= 2 else ticks
