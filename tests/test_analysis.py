"""The app's data layer (quantlab.analysis) on small hand-checked cases; no model needed but for one test."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from quantlab.analysis import plots
from quantlab.analysis import outliers, runs, sizes, tensors
from quantlab.errors import FormatError
from quantlab.numerics.formats import Granularity, QuantFormat


def test_quantize_vector_matches_the_hand_computation():
    # absmax 1.0, INT4 symmetric full range: s = 1/7.5 (fp16: 0.13330); 0.5/s = 3.751 -> 4, -1/s = -7.502 -> -8.
    result = tensors.quantize_vector([0.0, 0.5, -1.0, 0.7], QuantFormat.parse("int4-per-tensor"))
    assert result.table["code"].tolist() == [0, 4, -8, 5]
    assert result.table["scale"].iloc[0] == pytest.approx(torch.tensor(1 / 7.5).half().item())
    assert not result.table["clipped"].any()
    assert len(result.levels) == 16 and result.levels[8] == 0  # codes -8..7
    # Restricted: s = 1/7 (fp16: 0.14282); 0.5/s = 3.5009 -> 4, 0.7/s = 4.901 -> 5.
    restricted = tensors.quantize_vector([0.0, 0.5, -1.0, 0.7], QuantFormat.parse("int4-per-tensor-restricted"))
    assert restricted.table["code"].tolist() == [0, 4, -7, 5]
    assert len(restricted.levels) == 15 and restricted.levels[7] == 0  # codes -7..7


def test_range_comparison_shows_the_extra_level_and_what_the_full_range_clips():
    fmt = QuantFormat.parse("int4-per-tensor", scale_dtype="fp32")
    results = tensors.compare_symmetric_ranges([-7.5, 1.875, 5.625, 7.5], fmt)
    summary = tensors.range_summary(results, fmt).set_index("grid")
    # Full: s = 7.5 / 7.5 = 1, so 7.5 clamps to 7 (clipped) and -7.5 rounds (ties to even) to -8, the extra level.
    assert results["full"].table["code"].tolist() == [-8, 2, 6, 7]
    assert summary.loc["full", "values clipped"] == 1 and summary.loc["full", "values on the extra level"] == 1
    assert summary.loc["restricted", "values clipped"] == 0 and summary.loc["restricted", "levels"] == 15
    assert summary.loc["full", "scale rule"] == "absmax / 7.5" and summary.loc["restricted", "scale rule"] == "absmax / 7"
    with pytest.raises(FormatError, match="symmetric integer"):
        tensors.compare_symmetric_ranges([1.0, 2.0], QuantFormat.parse("int4-asym"))


def test_asymmetric_groups_get_their_own_zero_points():
    result = tensors.quantize_vector([0.12, -0.53, 0.91, -0.07], QuantFormat.parse("int4-g2-asym"))
    # group 0: range [-0.53, 0.12] -> s = 0.65/15, z = round(0.53 / s) = 12
    assert result.groups["zero_point"].tolist()[0] == 12
    assert (result.table["dequantized"] - result.table["value"]).abs().max() <= result.table["scale"].max() / 2 + 1e-6


def test_with_outlier_appends_ten_times_the_peak():
    values = tensors.with_outlier([0.5, -2.0, 1.0, 0.25])
    assert values == [0.5, -2.0, 1.0, 0.25, 20.0]  # nothing the user typed is overwritten
    with pytest.raises(FormatError):
        tensors.with_outlier([])


def test_scale_steps_put_the_numbers_into_both_formulas():
    values = [0.12, -0.53, 0.91, -0.07, 0.33, -1.2, 0.64, 0.05]
    sym = tensors.scale_steps(values, QuantFormat(n_bits=4))
    # full signed range (the default): s = max|x| / 7.5 at 4 bits, as compressed-tensors
    assert sym.high == pytest.approx(1.2) and sym.levels == 7.5 and sym.exact_scale == pytest.approx(1.2 / 7.5)
    assert sym.stored_scale == float(torch.tensor(1.2 / 7.5).half()) and sym.rounded  # fp16 of 0.16
    restricted = tensors.scale_steps(values, QuantFormat(n_bits=4, symmetric_range="restricted"))
    assert restricted.levels == 7 and restricted.exact_scale == pytest.approx(1.2 / 7)
    exact = tensors.scale_steps(values, QuantFormat(n_bits=4, scale_dtype="fp32"))
    assert exact.stored_scale == pytest.approx(1.2 / 7.5, rel=1e-7) and not exact.rounded
    asym = tensors.scale_steps(values, QuantFormat(n_bits=4, symmetric=False, scale_dtype="fp32"))
    assert (asym.low, asym.high, asym.levels) == pytest.approx((-1.2, 0.91, 15))
    assert asym.stored_scale == pytest.approx(2.11 / 15) and asym.zero_point == round(1.2 / (2.11 / 15))
    grouped = QuantFormat(n_bits=4, granularity=Granularity("group", 4))
    outlier = values[:7] + [12.0]  # the last of two groups of 4 holds it
    assert tensors.largest_group(outlier, grouped) == 1
    assert tensors.scale_steps(outlier, grouped, 1).high == 12.0
    grid = tensors.quantize_vector(outlier, grouped, 1).levels  # codes -8..7 times s = 12 / 7.5
    assert (grid.min(), grid.max()) == pytest.approx((-8 * 12.0 / 7.5, 7 * 12.0 / 7.5), rel=1e-3)


def test_histogram_counts_every_finite_value():
    values = torch.tensor([0.0, 1.0, 1.0, 2.0, float("nan")])
    hist = tensors.histogram(values, bins=2)
    assert hist["count"].sum() == 4 and hist["count"].tolist() == [1, 3]


def test_clipping_sweep_minimum_is_no_worse_than_min_max():
    W = torch.distributions.Laplace(0.0, 1.0).sample((64, 128))  # heavy tails: clipping pays off
    sweep = tensors.clipping_sweep(W, QuantFormat.parse("int3-g64"))
    best = tensors.best_ratio(sweep)
    no_clip = sweep[sweep["clip_ratio"] == 1.0].iloc[0]
    assert best["mse"] <= no_clip["mse"] and best["clip_ratio"] < 1.0
    # At ratio 1 the full range clips at most a block's positive peak (7.5 steps -> 7), one value per 64.
    assert 0 <= no_clip["clipped_fraction"] <= 1 / 64 and no_clip["clipping_mse"] < 0.05 * no_clip["mse"]
    restricted = tensors.clipping_sweep(W, QuantFormat.parse("int3-g64-restricted"))
    assert restricted[restricted["clip_ratio"] == 1.0].iloc[0]["clipped_fraction"] == 0
    assert np.allclose(sweep["mse"], sweep["rounding_mse"] + sweep["clipping_mse"])


def test_range_method_table_orders_min_max_percentile_mse():
    W = torch.randn(32, 256)
    table = tensors.range_method_table(W, QuantFormat.parse("int4-g128", range_method="percentile", percentile=99.0))
    assert table["range_method"].tolist() == ["minmax", "percentile 99", "mse"]
    assert table["clipped_fraction"].iloc[1] > 0 and table["mse"].iloc[2] <= table["mse"].iloc[0]


def test_weight_views_overlay_the_grid_of_the_largest_block():
    W = torch.randn(16, 64)
    W[3, 40] = 25.0
    views = tensors.weight_views(W, QuantFormat.parse("int4-g32"))
    assert views.block == (3, 1)  # row 3, second group of 32 holds the planted value
    # s = 25 / 7.5: the grid runs from -8 s to 7 s, so the planted 25 itself is clipped to 7 s.
    assert views.levels.max() == pytest.approx(25.0 * 7 / 7.5, rel=1e-3)
    assert views.levels.min() == pytest.approx(-25.0 * 8 / 7.5, rel=1e-3)
    assert views.summary["bits_per_weight"] == pytest.approx(4.5)


def test_file_matrices_skip_embeddings_and_non_matrices():
    found = tensors.file_matrices({
        "model.embed_tokens.weight": torch.zeros(10, 4), "model.layers.2.mlp.up_proj.weight": torch.zeros(8, 4),
        "model.layers.2.input_layernorm.weight": torch.zeros(4), "codes": torch.zeros(8, 4, dtype=torch.int8),
    })
    assert [(m.name, m.block, m.role) for m in found] == [("model.layers.2.mlp.up_proj.weight", 2, "up")]


def test_format_sizes_report_formats_that_do_not_fit():
    from quantlab.models.weightfiles import TensorInfo, TensorListing

    listing = TensorListing.of([TensorInfo("layers.0.proj.weight", (64, 96), "float32", 64 * 96 * 4)])
    table = sizes.format_sizes(listing, [QuantFormat.parse("int4-g32"), QuantFormat.parse("int4-g64")])
    assert table["bits_per_weight"].iloc[0] == pytest.approx(4.5)
    assert "does not divide" in table["note"].iloc[1]


def test_reference_sizes_reproduce_the_7b_rule_of_thumb():
    table = sizes.reference_sizes([QuantFormat.parse("int4-g128")])
    seven_b = table[table["model"] == "7B"].iloc[0]
    assert seven_b["weight_bytes"] == seven_b["quantized_params"] // 2  # 4 bits each
    assert seven_b["scale_bytes"] == seven_b["quantized_params"] // 128 * 2  # one fp16 scale per 128
    assert seven_b["bits_per_weight"] == pytest.approx(4.125)


def test_outlier_views_find_a_planted_channel():
    W = torch.randn(32, 64) * 0.02
    W[:, 17] *= 50
    matrix = tensors.NamedMatrix("blocks.0.fc.weight", 0, "fc", W)
    vectors = outliers.channel_vectors([matrix], "input")
    top = outliers.top_outliers(vectors, k=3)
    assert top.iloc[0]["channel"] == 17 and top.iloc[0]["ratio_to_median"] > 10
    z, labels = outliers.heatmap_matrix({"a": np.ones(3), "b": np.ones(5)})
    assert z.shape == (2, 5) and np.isnan(z[0, 3:]).all()
    assert outliers.excess_kurtosis(W) > outliers.excess_kurtosis(torch.randn(32, 64)) + 5


def test_pareto_front_keeps_only_undominated_points():
    table = pd.DataFrame({"bits": [16, 8, 4, 4, 3], "ppl": [10.0, 10.1, 11.0, 12.0, 15.0]})
    assert runs.pareto_front(table, "bits", "ppl").tolist() == [True, True, True, False, True]
    fidelity = pd.DataFrame({"bits": [16, 8, 8], "fid": [1.0, 0.99, 0.95]})
    assert runs.pareto_front(fidelity, "bits", "fid", lower_y_is_better=False).tolist() == [True, True, False]


def test_layer_sensitivity_leaves_the_model_untouched(tiny_model_dirs):
    from quantlab.evaluation import EvalConfig
    from quantlab.models.loading import load_model
    from quantlab.runs.pipeline import QuantSession

    loaded = load_model(tiny_model_dirs["llama"], device="cpu")
    before = {name: p.clone() for name, p in loaded.model.state_dict().items()}
    session = QuantSession(loaded, "def f(x):\n    return x + 1\n" * 200, EvalConfig(ctx=64, max_tokens=512))
    table = runs.layer_sensitivity(session, QuantFormat.parse("int2-g32"), roles=["down"])
    assert len(table) == len([m for m in tensors.model_matrices(loaded.model) if m.role == "down"])
    assert (table["kl_divergence"] > 0).all()
    after = loaded.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_figures_are_built_from_analysis_tables():
    result = tensors.quantize_vector([0.1, -0.4, 2.0, 0.3], QuantFormat.parse("int3-per-tensor"))
    assert len(plots.vector_figure(result).data) >= 2
    sweep = tensors.clipping_sweep(torch.randn(8, 32), QuantFormat.parse("int4"))
    figure = plots.clipping_figure(sweep, tensors.best_ratio(sweep))
    assert {trace.name for trace in figure.data} >= {"total MSE", "minimum"}


def test_tradeoff_figure_names_every_point_without_overlap():
    table = pd.DataFrame({"config": ["fp", "int8", "rtn-int4-g64", "rtn-int4-g128", "gptq-int4-g128"],
                          "method": ["fp", "rtn", "rtn", "rtn", "gptq"],
                          "bits_per_weight": [16.0, 8.0, 4.25, 4.125, 4.125],
                          "perplexity": [10.0, 10.1, 11.0, 12.0, 11.5], "perplexity_se": [0.3] * 5})
    table["pareto"] = runs.pareto_front(table, "bits_per_weight", "perplexity")
    figure = plots.tradeoff_figure(table, "bits_per_weight", "perplexity", "t", error="perplexity_se",
                                   highlight="rtn-int4-g64")
    points = [trace for trace in figure.data if trace.customdata is not None]
    assert [trace.name for trace in points] == list(table["config"])  # one legend entry per configuration
    rtn = [trace.marker for trace in points if trace.legendgroup == "rtn"]
    assert len({m.color for m in rtn}) == 1 and len({m.symbol for m in rtn}) == 3  # g64 and g128 told apart
    assert len({trace.marker.color for trace in points}) == 3  # fp, rtn, gptq
    assert all(list(trace.error_y.array) == [0.3] for trace in points)
    ringed = next(trace for trace in figure.data if trace.name == "recommended")
    assert list(ringed.x) == [4.25]  # rtn-int4-g64
    assert figure.layout.xaxis.type == "log" and figure.layout.xaxis.title.text == "bits per weight"
    front = next(trace for trace in figure.data if trace.name == "Pareto front")
    assert list(front.x) == [4.125, 4.25, 8.0, 16.0]
    assert {a.text for a in figure.layout.annotations} <= set(table["config"])
    assert {"fp", "int8"} <= {a.text for a in figure.layout.annotations}


def test_labels_are_placed_where_they_overlap_nothing():
    xs, ys = [4.125, 4.125, 4.125, 4.25, 8.0], [12.0, 12.05, 11.95, 11.0, 10.1]
    texts = ["rtn-int4-g128", "gptq-int4-g128", "awq-int4-g128", "rtn-int4-g64", "rtn-int8"]
    offsets = plots.place_labels(xs, ys, texts)
    px = plots._to_pixels(np.array(xs), True, plots.PLOT_PX[0])
    py = plots._to_pixels(np.array(ys), False, plots.PLOT_PX[1])
    boxes = [(x + o[0] - (plots.CHAR_PX * len(t) + 4) / 2, y + o[1] - plots.LINE_PX / 2,
              x + o[0] + (plots.CHAR_PX * len(t) + 4) / 2, y + o[1] + plots.LINE_PX / 2)
             for x, y, t, o in zip(px, py, texts, offsets) if o is not None]
    assert len(boxes) >= 4  # three points nearly on top of each other still get most of their names
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)


def test_log_size_ticks_read_as_plain_numbers():
    ticks = plots._log_ticks(pd.Series([5.3, 7.3, 17.0]))
    assert ticks == [5.0, 10.0, 20.0]
