"""NVFP4 and MXFP4 runs exported as compressed-tensors nvfp4-/mxfp4-pack-quantized folders: the library's
decompression gives back QuantLab's weights bit for bit, and the folder opens again."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from quantlab.errors import FormatError
from quantlab.runs.blockexport import decompress_layer
from quantlab.runs.export import export_compressed

from test_export import quantize, quantized_layers, random_ids


@pytest.mark.parametrize("name, format_name, scale_dtype", [
    ("rtn-nvfp4", "nvfp4-pack-quantized", torch.float8_e4m3fn),
    ("gptq-mxfp4", "mxfp4-pack-quantized", torch.uint8),
])
def test_block_export_round_trips_bit_exact(tiny_llama, tmp_path, name, format_name, scale_dtype):
    model, _, _ = quantize(tiny_llama, name, random_ids(4, 32))
    result = export_compressed(model, tmp_path / name)
    qc = json.loads((result.path / "config.json").read_text())["quantization_config"]
    assert qc["format"] == format_name and qc["config_groups"]["group_0"]["weights"]["type"] == "float"
    tensors = load_file(result.path / "model.safetensors")
    layers = quantized_layers(model)
    assert layers and set(result.quantized_layers) == set(layers)
    for layer, module in layers.items():
        fmt = module.fmt
        out, inp = module.codes.shape
        assert tensors[f"{layer}.weight_packed"].shape == (out, inp // 2)
        assert tensors[f"{layer}.weight_scale"].dtype == scale_dtype
        assert (f"{layer}.weight_global_scale" in tensors) == (fmt.kind == "nvfp4")
        stored = sum(tensors[f"{layer}.{k}"].nbytes for k in ("weight_packed", "weight_scale", "weight_global_scale")
                     if f"{layer}.{k}" in tensors)
        assert stored == fmt.storage(out, inp).total_bytes  # the accounting is the file, byte for byte
        library = decompress_layer(tensors, layer, fmt)  # bf16, as the library returns it
        assert torch.equal(library, module.dequantized_weight().to(library.dtype))


def test_block_export_opens_again_with_the_same_logits(tiny_llama, tmp_path):
    from quantlab.models.loading import load_model

    model, _, _ = quantize(tiny_llama, "rtn-mxfp4", random_ids(4, 32))
    result = export_compressed(model, tmp_path / "mxfp4")
    reloaded = load_model(str(result.path))  # a QuantLab model again: fp32, the library's decompression
    assert reloaded.model.dtype == torch.float32
    ids = random_ids(2, 16)
    with torch.no_grad():
        actual, expected = reloaded.model(ids).logits, model(ids).logits
        full_precision = tiny_llama(ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    assert (full_precision - expected).abs().max() > 1e-3  # the comparison can tell quantized from not


def test_other_block_formats_are_refused(tiny_llama, tmp_path):
    model, _, _ = quantize(tiny_llama, "rtn-mxfp8-e4m3", random_ids())
    with pytest.raises(FormatError, match="only nvfp4, mxfp4"):
        export_compressed(model, tmp_path / "fp8")
    assert not (tmp_path / "fp8").exists()
