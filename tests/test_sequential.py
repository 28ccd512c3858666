"""Sequential onloading: blocks read one at a time from the checkpoint give the in-memory path's codes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantlab.errors import FormatError, ModelLoadError
from quantlab.models.lazy import load_block, open_lazy
from quantlab.models.loading import BUNDLED_LM, load_model
from quantlab.recipe import CalibConfig, KVSpec, parse_config_name
from quantlab.runs.export import export_compressed
from quantlab.runs.pipeline import quantize_model
from quantlab.runs.sequential import STATE_FILE, partial_folder, quantize_sequential

CALIB = CalibConfig(n_samples=4, seq_len=64)


def stored(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = stored(a), stored(b)
    assert set(ta) == set(tb)
    different = [name for name in ta if ta[name].dtype != tb[name].dtype or not torch.equal(ta[name], tb[name])]
    assert not different, different[:5]


def in_memory_export(source, config, out: Path) -> Path:
    loaded = load_model(source, device="cpu")
    model, _ = quantize_model(loaded, config, evaluate_quality=False)
    export_compressed(model, out, loaded.tokenizer)
    return out


@pytest.mark.parametrize("name", ["int4-g64", "gptq-int4-g64"])
def test_bundled_lm_block_by_block_gives_the_in_memory_export(bundled_lm_path, tmp_path, name):
    config = parse_config_name(name, calib=CALIB)
    expected = in_memory_export(bundled_lm_path, config, tmp_path / "memory")
    done = quantize_sequential(open_lazy(bundled_lm_path, device="cpu"), config, tmp_path / "sequential")
    assert_same_tensors(expected, done.export)
    config_of = lambda folder: json.loads((folder / "config.json").read_text())["quantization_config"]  # noqa: E731
    assert config_of(done.export) == config_of(expected)
    assert len(done.blocks) == 4 and done.resumed_from == 0
    assert not partial_folder(tmp_path / "sequential").exists()


def test_bf16_sharded_checkpoint_with_act_order_gptq(bf16_untied, tmp_path):
    config = parse_config_name("gptq-int4-g32", calib=CALIB)
    expected = in_memory_export(bf16_untied, config, tmp_path / "memory")
    lazy = open_lazy(bf16_untied, device="cpu")
    assert lazy.dtype == torch.bfloat16 and lazy.model.lm_head.weight.is_meta  # the head is never read to calibrate
    assert all(p.is_meta for p in lazy.structure.blocks(lazy.model).parameters())
    done = quantize_sequential(lazy, config, tmp_path / "sequential")
    assert_same_tensors(expected, done.export)
    assert stored(done.export)["lm_head.weight"].dtype == torch.bfloat16


def test_the_export_opens_and_computes_what_the_quantized_model_does(bf16_untied, tmp_path):
    config = parse_config_name("int4-g32", calib=CALIB)
    loaded = load_model(bf16_untied, device="cpu")
    model, _ = quantize_model(loaded, config, evaluate_quality=False)
    done = quantize_sequential(open_lazy(bf16_untied, device="cpu"), config, tmp_path / "sequential")
    reopened = load_model(done.export, device="cpu")
    ids = torch.randint(0, 4096, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, actual = model(ids).logits.float(), reopened.model(ids).logits.float()
    assert reopened.stored is not None
    assert torch.allclose(actual, expected, atol=1e-2, rtol=1e-2)  # bf16 forward passes, same codes and scales


def test_a_stopped_run_resumes_where_it_stopped(bf16_untied, tmp_path):
    config = parse_config_name("gptq-int4-g64", calib=CALIB)
    uninterrupted = quantize_sequential(open_lazy(bf16_untied, device="cpu"), config, tmp_path / "whole").export

    def stop_after_first(report) -> None:
        raise KeyboardInterrupt

    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        quantize_sequential(open_lazy(bf16_untied, device="cpu"), config, out, on_block=stop_after_first)
    state = json.loads((partial_folder(out) / STATE_FILE).read_text())
    assert state["done"] == 1 and not out.exists()
    resumed = quantize_sequential(open_lazy(bf16_untied, device="cpu"), config, out)
    assert resumed.resumed_from == 1 and [b.index for b in resumed.blocks] == [1]
    assert_same_tensors(uninterrupted, resumed.export)
    assert len(resumed.run.layers) == 14  # both blocks' results, the first read back from the partial folder


def test_a_stopped_run_of_another_configuration_is_not_mixed_in(bf16_untied, tmp_path):
    out = tmp_path / "out"

    def stop(report) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_sequential(open_lazy(bf16_untied, device="cpu"), parse_config_name("int4-g64", calib=CALIB), out,
                            on_block=stop)
    with pytest.raises(FormatError, match="another model, configuration"):
        quantize_sequential(open_lazy(bf16_untied, device="cpu"), parse_config_name("int8", calib=CALIB), out)


def test_blocks_load_with_their_stored_weights(bf16_untied):
    lazy = open_lazy(bf16_untied, device="cpu")
    full = load_model(bf16_untied, device="cpu").model
    block = load_block(lazy, 1)
    for name, tensor in full.model.layers[1].state_dict().items():
        assert torch.equal(block.state_dict()[name], tensor), name
    assert lazy.structure.blocks(lazy.model)[1].mlp.down_proj.weight.is_meta  # the lazy model itself is unchanged


def test_unsupported_runs_and_sources_are_one_line(bf16_untied, tmp_path):
    lazy = open_lazy(bf16_untied, device="cpu")
    with pytest.raises(FormatError, match="needs the model in memory"):
        quantize_sequential(lazy, parse_config_name("awq-int4-g64", calib=CALIB), tmp_path / "a")
    with pytest.raises(FormatError, match="weight-only"):
        quantize_sequential(lazy, replace(parse_config_name("int4-g64", calib=CALIB), kv=KVSpec("int8", "per-token")),
                            tmp_path / "b")
    exported = quantize_sequential(lazy, parse_config_name("int4-g64", calib=CALIB), tmp_path / "c").export
    with pytest.raises(ModelLoadError, match="pre-quantized"):
        open_lazy(exported, device="cpu")


def test_quantize_command_sequential(bf16_untied, tmp_path, capsys):
    from quantlab.cli import main

    args = ["quantize", str(bf16_untied), "--method", "gptq", "--group-size", "64", "--calib-samples", "2",
            "--calib-len", "32", "--device", "cpu", "--sequential"]
    assert main(args) == 2
    assert "give --out" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "out"), "--json"]) == 0
    captured = capsys.readouterr()
    document = json.loads(captured.out)
    assert document["export"] == str(tmp_path / "out") and len(document["blocks"]) == 2
    assert "block 2 of 2:" in captured.err and "RSS" in captured.err
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["ignore"] == ["lm_head"] and qc["config_groups"]["group_0"]["weights"]["group_size"] == 64


def test_output_error_from_the_inputs_equals_the_hessian_form():
    from quantlab.calibrate.inputstats import accumulate_hessian
    from quantlab.numerics.measures import output_error, output_error_from_inputs

    generator = torch.Generator().manual_seed(0)
    X = [torch.randn(2, 64, 300, generator=generator) for _ in range(3)]  # 384 tokens, 300 inputs
    W = torch.randn(50, 300, generator=generator)
    W_hat = W + 0.01 * torch.randn(50, 300, generator=generator)
    H, n = torch.zeros(300, 300), 0
    for x in X:
        H, n = accumulate_hessian(x, H, n)
    assert output_error_from_inputs(W, W_hat, X) == pytest.approx(output_error(W, W_hat, H), rel=1e-5)
    assert output_error_from_inputs(W, W, X) == 0.0
