"""Export to compressed-tensors pack-quantized: bit-exact codes, library and transformers reload, sizes.

Quantized models come from the real block runner (RTN and GPTQ) on the bundled LM or a tiny Llama;
reloading uses compressed-tensors' own unpacking and decompression and transformers' loader.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from quantlab.algorithms import gptq, rtn
from quantlab.recipe import CalibConfig, GPTQParams, RunResult, parse_config_name
from quantlab.models.architectures import find_linears
from quantlab.calibrate.runner import calibration_set, collect_activation_stats, run_blocks
from quantlab.errors import DataError, FormatError
from quantlab.runs.export import STATS_FILE, export_compressed, export_run_data, load_run_data, read_compressed
from quantlab.models.quantized import QuantizedLinear
from quantlab.numerics.primitives import dequantize
from quantlab.runs.records import read_record
from quantlab.models.sizing import model_size

from conftest import VOCAB

PROCESS = {"rtn": rtn.process_block, "gptq": gptq.process_block}


def quantize(model, name: str, calib_ids: torch.Tensor, **overrides):
    """A quantized model and the run's layers, from the real block runner."""
    config = parse_config_name(name, calib=CalibConfig(n_samples=calib_ids.shape[0], seq_len=calib_ids.shape[1]),
                               **overrides)
    run = run_blocks(model, calib_ids, PROCESS[config.method], config)
    return run.model, run.layers, config


def random_ids(n: int = 2, length: int = 32, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(1))


def quantized_layers(model) -> dict[str, QuantizedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def library_weights(folder) -> dict[str, torch.Tensor]:
    """Every weight as compressed-tensors' own decompression gives it, in fp32."""
    tensors = load_file(folder / "model.safetensors")
    return CompressedTensorsDequantizer(str(folder), dtype=torch.float32).validate(tensors)


def assert_fp16_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # The library dequantizes in the scale dtype (fp16), QuantLab in fp32: one fp16 rounding apart.
    torch.testing.assert_close(actual, expected, rtol=2**-10, atol=2**-24)


@pytest.fixture(scope="module")
def gptq_export(bundled_lm, tmp_path_factory):
    ids = calibration_set(bundled_lm.tokenizer, CalibConfig(n_samples=4, seq_len=64))
    model, _, config = quantize(bundled_lm.model, "gptq-int4-g64", ids)
    out = tmp_path_factory.mktemp("export") / "gptq-int4-g64"
    return model, config, export_compressed(model, out, bundled_lm.tokenizer)


def test_config_describes_the_format(gptq_export):
    _, _, result = gptq_export
    qc = json.loads((result.path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    weights = qc["config_groups"]["group_0"]["weights"]
    assert weights == {**weights, "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                       "group_size": 64}
    assert qc["ignore"] == ["lm_head"]
    assert qc["quantlab"] == {"weight_format": "int4-g64", "symmetric_range": "full", "codes": [-8, 7],
                              "scale": "absmax / 7.5", "scale_dtype": "fp16"}
    assert {"tokenizer.json", "model.safetensors", "config.json"} <= set(result.files)


def test_symmetric_codes_are_bit_exact_and_library_decompression_matches(gptq_export):
    model, _, result = gptq_export
    tensors = load_file(result.path / "model.safetensors")
    layers = quantized_layers(model)
    assert len(layers) == 28 and set(result.quantized_layers) == set(layers)
    decompressed = library_weights(result.path)
    for name, module in layers.items():
        packed = tensors[f"{name}.weight_packed"]
        assert packed.dtype == torch.int32 and f"{name}.weight_zero_point" not in tensors
        codes = unpack_from_int32(packed, 4, tensors[f"{name}.weight_shape"])
        assert torch.equal(codes, module.codes)  # QuantLab's full-range [-8, 7] codes, unchanged
        assert_fp16_close(decompressed[f"{name}.weight"], module.dequantized_weight())


def test_transformers_loads_the_export_with_the_same_logits(gptq_export, bundled_lm):
    model, _, result = gptq_export
    reloaded = AutoModelForCausalLM.from_pretrained(result.path).eval()
    assert not any(isinstance(m, QuantizedLinear) for m in reloaded.modules())
    ids = random_ids(3, 24)
    with torch.no_grad():
        expected, actual = model(ids).logits, reloaded(ids).logits
        full_precision = bundled_lm.model(ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    assert (full_precision - expected).abs().max() > 1e-2  # the comparison can tell quantized from not


def test_folder_size_matches_the_size_accounting(gptq_export, bundled_lm):
    _, config, result = gptq_export
    accounted = model_size(bundled_lm.model, config.weight_format).total_bytes
    assert abs(result.weights_bytes - accounted) / accounted < 0.01
    # The rest of the folder is config, generation config and tokenizer files.
    assert result.folder_bytes - result.weights_bytes == sum(
        (result.path / f).stat().st_size for f in result.files if not f.endswith(".safetensors"))


@pytest.mark.parametrize("name", ["rtn-int4-g32-asym", "rtn-int8-asym", "rtn-int3-per-tensor-asym"])
def test_asymmetric_codes_and_zero_points_shift_exactly(tiny_llama, tmp_path, name):
    model, _, config = quantize(tiny_llama, name, random_ids())
    fmt = config.weight_format
    result = export_compressed(model, tmp_path / "out")
    tensors = load_file(result.path / "model.safetensors")
    decompressed = library_weights(result.path)
    half = 2 ** (fmt.n_bits - 1)
    reference = copy.deepcopy(tiny_llama)
    for name_, module in quantized_layers(model).items():
        codes = unpack_from_int32(tensors[f"{name_}.weight_packed"], fmt.n_bits, tensors[f"{name_}.weight_shape"])
        assert torch.equal(codes.int(), module.codes.int() - half)
        zero_point = tensors[f"{name_}.weight_zero_point"]
        if fmt.granularity.kind != "tensor":
            zero_point = unpack_from_int32(zero_point, fmt.n_bits, tensors[f"{name_}.weight_scale"].shape, packed_dim=0)
        assert torch.equal(zero_point.int().flatten(), module.zero_point.int().flatten() - half)
        assert_fp16_close(decompressed[f"{name_}.weight"], module.dequantized_weight())
        reference.get_submodule(name_).weight.data = decompressed[f"{name_}.weight"]
    ids = random_ids(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(reference(ids).logits, model(ids).logits, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ["rtn-int4-g32", "rtn-int4-g32-restricted", "rtn-int8", "rtn-int4-g32-asym"])
def test_exports_read_back_into_quantlab_bit_exactly(tiny_llama, tmp_path, name):
    model, _, config = quantize(tiny_llama, name, random_ids())
    result = export_compressed(model, tmp_path / "out")
    fmt = config.weight_format
    assert result.quantization_config["quantlab"]["symmetric_range"] == (fmt.symmetric_range if fmt.symmetric else None)
    read = read_compressed(result.path)
    layers = quantized_layers(model)
    assert set(read) == set(layers)
    for layer_name, module in layers.items():
        qt = read[layer_name]
        assert qt.fmt == fmt  # the range comes back from quantization_config.quantlab
        assert torch.equal(qt.codes, module.codes) and torch.equal(qt.qparams.scale, module.scale)
        if fmt.has_zero_point:
            assert torch.equal(qt.qparams.zero_point.int(), module.zero_point.int())
        assert torch.equal(dequantize(qt), module.dequantized_weight())
    if fmt.restricted:
        assert all(int(qt.codes.min()) >= -7 for qt in read.values())
    elif fmt.symmetric:
        assert min(int(qt.codes.min()) for qt in read.values()) == -(2 ** (fmt.n_bits - 1))


def test_refuses_a_non_empty_folder_and_keeps_its_files(tiny_llama, tmp_path):
    model, _, _ = quantize(tiny_llama, "rtn-int4-g32", random_ids())
    target = tmp_path / "taken"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FormatError, match="not empty"):
        export_compressed(model, target)
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no staging folder left behind
    assert (target / "notes.txt").read_text() == "keep me"
    (target / "notes.txt").unlink()
    assert export_compressed(model, target).path == target  # an empty folder is fine


def test_formats_without_a_pack_quantized_form_are_refused(tiny_llama, tmp_path):
    model, _, _ = quantize(tiny_llama, "rtn-nf4-g32", random_ids())
    with pytest.raises(FormatError, match="integer formats"):
        export_compressed(model, tmp_path / "nf4")
    assert not (tmp_path / "nf4").exists()


def test_gptq_act_order_exports_with_static_groups_only(tiny_llama, tmp_path):
    ids = random_ids(4, 32)
    permuted, _, _ = quantize(tiny_llama, "gptq-int4-g32", ids, gptq=GPTQParams(act_order=True, static_groups=False))
    with pytest.raises(FormatError, match="static groups"):
        export_compressed(permuted, tmp_path / "dynamic")
    static, _, _ = quantize(tiny_llama, "gptq-int4-g32", ids, gptq=GPTQParams(act_order=True, static_groups=True))
    result = export_compressed(static, tmp_path / "static")
    decompressed = library_weights(result.path)
    for name, module in quantized_layers(static).items():
        assert_fp16_close(decompressed[f"{name}.weight"], module.dequantized_weight())


def test_run_data_reopens_without_recomputing(tiny_llama, tmp_path):
    ids = random_ids(2, 32)
    _, layers, config = quantize(tiny_llama, "rtn-int4-g32", ids)
    run = RunResult(config, tuple(layers), bits_per_weight=4.5, total_bytes=1234, seconds=0.5,
                    quality={"perplexity": 12.5})
    stats = collect_activation_stats(tiny_llama, ids)
    assert set(stats) == {info.name for info in find_linears(tiny_llama)}
    folder = export_run_data(run, stats, tmp_path / "data")
    data = load_run_data(folder)
    assert data.record.runs[0].to_dict() == run.to_dict()
    assert read_record(folder / "runs.json").runs[0].layers == run.layers
    for name, layer_stats in stats.items():
        assert torch.equal(data.stats[name].absmax, layer_stats.absmax)
        assert torch.equal(data.stats[name].p999, layer_stats.p999)
        assert data.stats[name].n_tokens == layer_stats.n_tokens == ids.numel()
    with pytest.raises(FormatError, match="not empty"):
        export_run_data(run, stats, folder)
    (folder / STATS_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="calibration statistics"):
        load_run_data(folder)


def test_quantize_command_exports_and_refuses_a_taken_folder(bundled_lm_path, tmp_path, capsys):
    from quantlab.cli import main

    args = ["quantize", str(bundled_lm_path), "--format", "int4", "--group-size", "64", "--calib-samples", "2",
            "--calib-len", "32", "--max-eval-tokens", "256", "--device", "cpu", "--json"]
    assert main(args + ["--out", str(tmp_path / "exported")]) == 0
    document = json.loads(capsys.readouterr().out)
    qc = json.loads((tmp_path / "exported" / "config.json").read_text())["quantization_config"]
    assert document["export"] == str(tmp_path / "exported")
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 64
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert main(args + ["--out", str(taken)]) == 2
    assert "not empty" in capsys.readouterr().err and (taken / "keep.txt").read_text() == "mine"
