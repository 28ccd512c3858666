"""Mixed precision under a size budget: the knapsack, the measured plan run, its export, the CLI's bad budgets.

The planner is checked against brute force on small cases; the engine end to end on a tiny real
Llama (measured sensitivities, a real quantized run with its perplexity, exact bytes); the export
against compressed-tensors' own decompression.
"""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from quantlab.analysis import plan as planning
from quantlab.analysis.planner import Budget, LayerChoices, LayerOption, allocate
from quantlab.cli import main
from quantlab.errors import FormatError
from quantlab.evaluation import EvalConfig
from quantlab.models.loading import load_model
from quantlab.models.quantized import QuantizedLinear
from quantlab.numerics.formats import QuantFormat
from quantlab.recipe import CalibConfig, QuantConfig
from quantlab.runs.pipeline import QuantSession, quantize_model

TEXT = "def add(x, y):\n    return x + y\n\nclass Point:\n    def __init__(self, x):\n        self.x = x\n" * 80
CANDIDATES = ("int8", "int4-g32")  # the tiny Llama's rows are 64 and 128 wide: g32 fits every layer
CALIB = CalibConfig(n_samples=2, seq_len=32)


def random_layers(rng: random.Random, n_layers: int) -> list[LayerChoices]:
    layers = []
    for i in range(n_layers):
        params = rng.choice((64, 128, 256)) * 16
        options = tuple(LayerOption(f"b{bits}", params * bits // 8 + rng.randint(0, 40), rng.random() / bits)
                        for bits in (8, 4, 3))
        layers.append(LayerChoices(f"layer{i}", params, options))
    return layers


def brute_force(layers: list[LayerChoices], budget_bytes: int) -> float:
    best = float("inf")
    for combo in itertools.product(*(layer.options for layer in layers)):
        if sum(o.n_bytes for o in combo) <= budget_bytes:
            best = min(best, sum(o.loss for o in combo))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_the_plan_fits_the_budget_and_is_optimal(seed):
    rng = random.Random(seed)
    layers = random_layers(rng, 5)
    smallest = sum(min(o.n_bytes for o in layer.options) for layer in layers)
    largest = sum(max(o.n_bytes for o in layer.options) for layer in layers)
    budget_bytes = rng.randint(smallest, largest)  # under RESOLUTION bytes: the programme is exact
    plan = allocate(layers, budget_bytes)
    assert plan.n_bytes <= budget_bytes
    assert [name for name, _ in plan.choices] == [layer.name for layer in layers]
    assert plan.predicted_loss == pytest.approx(brute_force(layers, budget_bytes))


def test_a_large_budget_is_resolved_in_units_and_never_exceeded():
    layers = [LayerChoices(f"l{i}", 4096 * 4096, (LayerOption("int8", 4096 * 4096, 0.0),
                                                   LayerOption("int4", 4096 * 2048 + 7, 0.01 * (i + 1))))
              for i in range(8)]
    budget_bytes = 6 * 4096 * 4096 + 3  # four layers at 4 bits would be 4 x 7 bytes over: five must go
    plan = allocate(layers, budget_bytes)
    assert plan.n_bytes <= budget_bytes
    # the least sensitive layers (the first ones) go to 4 bits, the most sensitive keep 8
    assert [option.fmt_name for _, option in plan.choices] == ["int4"] * 5 + ["int8"] * 3


def test_the_more_sensitive_layer_gets_more_bits():
    def layer(name: str, loss_at_4: float) -> LayerChoices:
        return LayerChoices(name, 1024, (LayerOption("int8", 1024, 0.0), LayerOption("int4", 512, loss_at_4),
                                         LayerOption("int3", 384, 4 * loss_at_4)))

    layers = [layer("robust", 0.001), layer("sensitive", 0.1)]
    chosen = dict((name, option.fmt_name) for name, option in allocate(layers, 1024 + 384).choices)
    assert chosen == {"robust": "int3", "sensitive": "int8"}
    chosen = dict((name, option.fmt_name) for name, option in allocate(layers, 512 + 384).choices)
    assert chosen == {"robust": "int3", "sensitive": "int4"}


def test_a_budget_below_every_plan_says_so():
    layers = [LayerChoices("a", 1000, (LayerOption("int8", 1000, 0.0), LayerOption("int4", 500, 0.1)))]
    with pytest.raises(FormatError, match="below the smallest plan"):
        allocate(layers, 499)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "give one budget"), ({"bits_per_weight": 4.5, "mib": 3.0}, "give one budget"),
    ({"bits_per_weight": 0.5}, "outside"), ({"bits_per_weight": float("nan")}, "positive"), ({"mib": -1.0}, "positive"),
])
def test_bad_budgets_are_refused(kwargs, message):
    with pytest.raises(FormatError, match=message):
        Budget(**kwargs)


def test_a_mib_budget_counts_the_kept_layers():
    assert Budget(mib=2.0).quantized_bytes(10**6, 2**20) == 2**20
    with pytest.raises(FormatError, match="kept in full precision"):
        Budget(mib=1.0).quantized_bytes(10**6, 2**20)


def test_mixed_configs_round_trip_and_name_their_formats():
    int8, int4 = QuantFormat.parse("int8"), QuantFormat.parse("int4-g32")
    config = QuantConfig(method="rtn", weight_format=int4, layer_formats=(("b.down", int8), ("a.q", int4)))
    assert config.layer_formats[0][0] == "a.q"  # sorted
    assert config.name == "rtn-mixed-int4-g32x1-int8-per-channelx1"
    assert config.format_for("b.down") == int8 and config.format_for("c.up") == int4
    assert QuantConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(FormatError, match="per-layer formats run with"):
        QuantConfig(method="awq", weight_format=int4, layer_formats=(("a.q", int8),))


@pytest.fixture(scope="module")
def tiny_plan(tiny_model_dirs):
    loaded = load_model(tiny_model_dirs["llama"], device="cpu")
    session = QuantSession(loaded, TEXT, EvalConfig(ctx=64, max_tokens=512))
    fmts = planning.candidate_formats(CANDIDATES, loaded)
    sensitivity = planning.measure_sensitivity(session, fmts)
    plan = planning.make_plan(loaded, sensitivity, Budget(bits_per_weight=6.0))
    return loaded, session, sensitivity, plan


def test_sensitivities_are_measured_per_layer_and_format(tiny_plan):
    loaded, _, sensitivity, _ = tiny_plan
    table = sensitivity.table
    assert len(table) == len(loaded.structure.linears) * len(CANDIDATES)
    assert sensitivity.metric == "perplexity" and (table["loss"] == table["kl_divergence"]).all()
    by_format = table.groupby("format")["loss"].mean()
    assert by_format["int4-g32"] > by_format["int8-per-channel"] > 0  # fewer bits move the model further


def test_the_measured_run_is_the_plan(tiny_plan, tmp_path):
    loaded, session, _, plan = tiny_plan
    assert plan.allocation.bits_per_weight <= 6.0
    chosen = {option.fmt_name for _, option in plan.allocation.choices}
    assert chosen == {"int8-per-channel", "int4-g32"}  # 6 bits per weight lies between the two
    model, result = quantize_model(loaded, plan.config(calib=CALIB), session=session)
    assert result.bits_per_weight == pytest.approx(plan.allocation.bits_per_weight, abs=1e-12)
    assert result.total_bytes == plan.total_bytes
    formats = {name: m.fmt.name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert formats == {name: option.fmt_name for name, option in plan.allocation.choices}
    base = session.quality(loaded.model)["perplexity"]
    assert result.quality["perplexity"] > 1 and result.quality["kl_divergence"] > 0
    uniform = planning.run_uniform(session, CANDIDATES, calib=CALIB)
    table = planning.comparison_table(plan, result, uniform, base)
    assert list(table["kind"]) == ["plan", "uniform", "uniform"]
    kl = dict(zip(table["config"], table["measured_kl"]))
    assert kl["rtn-int8-per-channel"] < kl[result.config.name] < kl["rtn-int4-g32"]


def test_the_mixed_export_has_one_group_per_format_and_decompresses_exactly(tiny_plan, tmp_path):
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
    from safetensors.torch import load_file

    from quantlab.runs.export import export_compressed

    loaded, session, _, plan = tiny_plan
    model, _ = quantize_model(loaded, plan.config(calib=CALIB), session=session, evaluate_quality=False)
    result = export_compressed(model, tmp_path / "plan", loaded.tokenizer)
    groups = result.quantization_config["config_groups"]
    assert len(groups) == 2 and result.quantization_config["format"] == "pack-quantized"
    targets = {target for group in groups.values() for target in group["targets"]}
    assert targets == {name for name, _ in plan.allocation.choices}
    bits = {group["weights"]["num_bits"] for group in groups.values()}
    assert bits == {8, 4}
    tensors = load_file(result.path / "model.safetensors")
    library = CompressedTensorsDequantizer(str(result.path), dtype=torch.float32).validate(tensors)
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):  # the library dequantizes in fp16, QuantLab in fp32
            torch.testing.assert_close(library[f"{name}.weight"], module.dequantized_weight(), rtol=2**-10, atol=2**-24)
    reopened = load_model(str(result.path), device="cpu")  # QuantLab reads every group back
    ids = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reopened.model(ids).logits, model(ids).logits, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("argv, message", [
    (["plan"], "one of the arguments --budget-bpw --budget-mib is required"),
    (["plan", "--budget-bpw", "0.5"], "outside"),
    (["plan", "--budget-bpw", "nan"], "outside"),
    (["plan", "--budget-bpw", "four"], "not a number"),
    (["plan", "--budget-bpw", "4", "--budget-mib", "3"], "not allowed with"),
])
def test_the_plan_command_refuses_bad_budgets(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_plan_command_refuses_a_budget_no_plan_fits(tiny_model_dirs, capsys):
    code = main(["plan", str(tiny_model_dirs["llama"]), "--budget-bpw", "3", "--candidates", "int8,int4-g32",
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "below the smallest plan" in err and err.count("\n") == 1
    code = main(["plan", str(tiny_model_dirs["llama"]), "--budget-bpw", "5", "--candidates", "int4-g128"])
    assert code == 2 and "cannot store" in capsys.readouterr().err  # g128 does not divide 64-wide rows


# --- GGUF size references -----------------------------------------------------------------------
def test_gguf_bits_per_weight_are_the_published_block_structs():
    from quantlab.models.gguf import GGUF_TYPES, gguf_type

    expected = {"Q8_0": (32, 34, 8.5), "Q4_0": (32, 18, 4.5), "Q4_K": (256, 144, 4.5), "Q5_K": (256, 176, 5.5),
                "Q6_K": (256, 210, 6.5625)}
    assert {t.name: (t.block_size, t.block_bytes, t.bits_per_weight) for t in GGUF_TYPES} == expected
    assert gguf_type("q4_k").tensor_bytes(4096, 4096) == 4096 * 16 * 144
    with pytest.raises(FormatError, match="not a whole number of blocks"):
        gguf_type("Q6_K").tensor_bytes(64, 200)


def test_gguf_references_size_the_reference_models_exactly():
    from quantlab.analysis import sizes

    table = sizes.gguf_reference_sizes()
    seven = table[(table["model"] == "7B")].set_index("format")
    int8 = sizes.reference_sizes([QuantFormat.parse("int8")]).query("model == '7B'").iloc[0]
    q8 = seven.loc["gguf-Q8_0"]
    assert q8["weight_bytes"] == int8["quantized_params"] * 34 // 32  # every linear: 34 bytes per 32 weights
    assert q8["total_bytes"] == q8["weight_bytes"] + int8["full_precision_bytes"]
    assert seven["bits_per_weight"].to_dict() == pytest.approx(
        {"gguf-Q8_0": 8.5, "gguf-Q4_0": 4.5, "gguf-Q4_K": 4.5, "gguf-Q5_K": 5.5, "gguf-Q6_K": 6.5625})
    assert (table["note"].str.contains("quality not simulated")).all()


def test_gguf_references_refuse_rows_that_are_not_whole_blocks(tiny_model_dirs):
    from quantlab.analysis import sizes

    table = sizes.gguf_sizes(load_model(tiny_model_dirs["llama"], device="cpu")).set_index("format")
    assert table.loc["gguf-Q8_0", "bits_per_weight"] == 8.5 and table.loc["gguf-Q8_0", "total_bytes"] > 0
    assert "cannot store this model" in table.loc["gguf-Q4_K", "note"]  # 64-wide rows, 256-value blocks


def test_a_plan_with_nvfp4_exports_as_mixed_precision(tiny_plan, tmp_path):
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
    from safetensors.torch import load_file

    from quantlab.errors import ModelLoadError
    from quantlab.runs.export import export_compressed

    loaded, session, _, _ = tiny_plan
    names = [info.name for info in loaded.structure.linears]
    layer_formats = tuple((name, QuantFormat.parse("nvfp4" if i % 2 else "int4-g32")) for i, name in enumerate(names))
    config = QuantConfig(method="rtn", weight_format=QuantFormat.parse("int4-g32"), layer_formats=layer_formats,
                         calib=CALIB)
    model, _ = quantize_model(loaded, config, session=session, evaluate_quality=False)
    result = export_compressed(model, tmp_path / "mixed", loaded.tokenizer)
    assert result.quantization_config["format"] == "mixed-precision"
    formats = sorted(group["format"] for group in result.quantization_config["config_groups"].values())
    assert formats == ["nvfp4-pack-quantized", "pack-quantized"]
    library = CompressedTensorsDequantizer(str(result.path), dtype=torch.float32).validate(
        load_file(result.path / "model.safetensors"))
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            torch.testing.assert_close(library[f"{name}.weight"], module.dequantized_weight(), rtol=2**-8, atol=2**-24)
    # transformers 5 cannot convert a mixed folder with FP4 groups, and QuantLab's reader holds integer layouts:
    # reopening it is refused in one line rather than loaded wrong.
    with pytest.raises(ModelLoadError, match="nvfp4-pack-quantized"):
        load_model(str(result.path), device="cpu")
