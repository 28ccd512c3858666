"""Pre-quantized checkpoints open: QuantLab's own exports, compressed-tensors' own, GPTQ and AWQ GEMM.

Each folder is written by a real quantization (QuantLab's runner or compressed-tensors' compressor);
GPTQ and AWQ tensors are packed here with the loops of AutoGPTQ's and AutoAWQ's ``pack``, so the
readers are checked against the layouts those tools write, not against themselves.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from quantlab.errors import ModelLoadError
from quantlab.evaluation import EvalConfig, evaluate, load_text
from quantlab.models.loading import copy_model, load_model
from quantlab.models.quantized import QuantizedLinear
from quantlab.numerics.formats import QuantFormat
from quantlab.numerics.primitives import dequantize, quantize
from quantlab.recipe import CalibConfig, parse_config_name
from quantlab.runs.export import export_compressed
from quantlab.runs.pipeline import quantize_model

EVAL = EvalConfig(max_tokens=1024)


def perplexity(model, loaded) -> float:
    return evaluate(model, loaded.tokenizer, "causal", load_text("heldout"), EVAL).perplexity


@pytest.mark.parametrize("name", ["rtn-int4-g64", "gptq-int4-g64-asym", "int8-asym"])
def test_export_then_eval_gives_the_in_memory_perplexity(bundled_lm, tmp_path, name):
    config = parse_config_name(name, calib=CalibConfig(n_samples=2, seq_len=64))
    model, _ = quantize_model(bundled_lm, config, evaluate_quality=False)
    in_memory = perplexity(model, bundled_lm)
    export_compressed(model, tmp_path / "export", bundled_lm.tokenizer)
    reopened = load_model(tmp_path / "export", device="cpu")
    assert reopened.stored is not None and reopened.stored.method == "compressed-tensors"
    assert len(reopened.stored.layers) == len(bundled_lm.structure.linears)
    assert perplexity(reopened.model, reopened) == pytest.approx(in_memory, rel=1e-3)
    # The stored grid comes back: every reopened weight is its QuantizedLinear's dequantization.
    for name_, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            torch.testing.assert_close(reopened.model.get_submodule(name_).weight, module.dequantized_weight())


def test_quantizing_a_prequantized_model_warns(bundled_lm, tmp_path):
    calib = CalibConfig(n_samples=2, seq_len=32)
    model, _ = quantize_model(bundled_lm, parse_config_name("int4-g64", calib=calib), evaluate_quality=False)
    export_compressed(model, tmp_path / "export", bundled_lm.tokenizer)
    reopened = load_model(tmp_path / "export", device="cpu")
    _, result = quantize_model(reopened, parse_config_name("int8", calib=calib), evaluate_quality=False)
    assert any("pre-quantized" in w and "dequantized" in w for w in result.warnings)
    assert copy_model(reopened).stored == reopened.stored


def _compressed_tensors_folder(source, folder, fmt: str, args_kw: dict):
    """A folder written by compressed-tensors' own compressor, and the fake-quantized reference model."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs, QuantizationConfig, QuantizationScheme, apply_quantization_config,
    )
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    args = QuantizationArgs(**args_kw)
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"g": QuantizationScheme(targets=["Linear"], weights=args)}, ignore=["lm_head"]),
        show_progress=False)
    for name, module in model.named_modules():
        if not hasattr(module, "weight_scale"):
            continue
        W = module.weight.data
        blocks = W.reshape(W.shape[0], -1, args.group_size) if args.group_size else W.reshape(W.shape[0], 1, -1)
        scale, zero_point = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args)
        module.weight_scale.data = scale.reshape(module.weight_scale.shape).to(module.weight_scale.dtype)
        zp = getattr(module, "weight_zero_point", None)
        if zp is not None:
            zp.data = zero_point.reshape(zp.shape).to(zp.dtype)
        reference.get_submodule(name).weight.data = fake_quantize(W, module.weight_scale, zp, args)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(str(folder))
    return reference


@pytest.mark.parametrize("fmt, args_kw", [
    ("pack-quantized", dict(num_bits=4, type="int", symmetric=False, strategy="group", group_size=64)),
    ("int-quantized", dict(num_bits=8, type="int", symmetric=True, strategy="channel")),
    ("float-quantized", dict(num_bits=8, type="float", symmetric=True, strategy="channel")),
])
def test_folders_written_by_compressed_tensors_open(bundled_lm, bundled_lm_path, tmp_path, fmt, args_kw):
    reference = _compressed_tensors_folder(bundled_lm_path, tmp_path / fmt, fmt, args_kw)
    bundled_lm.tokenizer.save_pretrained(tmp_path / fmt)
    reopened = load_model(tmp_path / fmt, device="cpu")
    assert reopened.stored.layout == fmt
    for info in bundled_lm.structure.linears:
        torch.testing.assert_close(reopened.model.get_submodule(info.name).weight,
                                   reference.get_submodule(info.name).weight, rtol=2**-10, atol=1e-6)
    assert perplexity(reopened.model, reopened) == pytest.approx(perplexity(reference, bundled_lm), rel=1e-3)


# --- GPTQ and AWQ GEMM: packed here with the reference tools' loops ------------------------------

def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ's qweight loop: 32/bits consecutive rows into one int32 row, lowest bits first."""
    per_word = 32 // bits
    rows = codes.shape[0] // per_word
    packed = torch.zeros(rows, codes.shape[1], dtype=torch.int64)
    for row in range(rows):
        for j in range(per_word):
            packed[row] |= codes[row * per_word + j].long() << (bits * j)
    return _as_int32(packed)


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words (held in int64) as the int32 bit patterns the checkpoints store."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _gptq_tensors(W: torch.Tensor, group_size: int) -> tuple[dict, torch.Tensor]:
    """GPTQ v1 tensors of an asymmetric int4 quantization of W (out, in), and its dequantized weight."""
    fmt = QuantFormat.parse(f"int4-g{group_size}-asym", scale_dtype="fp16")
    qt = quantize(W, fmt)
    codes = qt.codes.to(torch.int32)  # (out, in) in [0, 15]
    zeros = qt.qparams.zero_point.reshape(W.shape[0], -1).to(torch.int32)  # (out, groups)
    tensors = {
        "qweight": _pack_rows(codes.t().contiguous(), 4),  # (in/8, out)
        "qzeros": _pack_rows((zeros - 1).contiguous(), 4).t().contiguous(),  # v1 stores z - 1; (groups, out/8)
        "scales": qt.qparams.scale.reshape(W.shape[0], -1).t().contiguous(),  # (groups, out)
        "g_idx": torch.arange(W.shape[1], dtype=torch.int32) // group_size,
    }
    return tensors, dequantize(qt)


def _awq_pack_cols(codes: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's GEMM pack: columns 8c + (0,2,4,6,1,3,5,7)[i] go to nibble i of word c."""
    order = (0, 2, 4, 6, 1, 3, 5, 7)
    packed = torch.zeros(codes.shape[0], codes.shape[1] // 8, dtype=torch.int64)
    for col in range(codes.shape[1] // 8):
        for i in range(8):
            packed[:, col] |= codes[:, col * 8 + order[i]].long() << (4 * i)
    return _as_int32(packed)


def _awq_tensors(W: torch.Tensor, group_size: int) -> tuple[dict, torch.Tensor]:
    fmt = QuantFormat.parse(f"int4-g{group_size}-asym", scale_dtype="fp16")
    qt = quantize(W, fmt)
    zeros = qt.qparams.zero_point.reshape(W.shape[0], -1)  # (out, groups)
    tensors = {
        "qweight": _awq_pack_cols(qt.codes.t().contiguous()),  # (in, out/8)
        "qzeros": _awq_pack_cols(zeros.t().contiguous()),  # (groups, out/8)
        "scales": qt.qparams.scale.reshape(W.shape[0], -1).t().contiguous(),  # (groups, out)
    }
    return tensors, dequantize(qt)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_gptq_and_awq_gemm_checkpoints_open(tiny_model_dirs, tmp_path, method):
    source = tiny_model_dirs["llama"]
    state = load_file(source / "model.safetensors")
    expected, group_size = {}, 32
    for key in [k for k in state if k.endswith("_proj.weight")]:
        stem = key.removesuffix(".weight")
        tensors, expected[stem] = (_gptq_tensors if method == "gptq" else _awq_tensors)(state.pop(key), group_size)
        state.update({f"{stem}.{name}": t for name, t in tensors.items()})
    folder = tmp_path / method
    folder.mkdir()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = (
        {"quant_method": "gptq", "bits": 4, "group_size": group_size, "sym": False, "desc_act": False,
         "checkpoint_format": "gptq"} if method == "gptq" else
        {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"})
    (folder / "config.json").write_text(json.dumps(config))
    reopened = load_model(folder, device="cpu")
    assert reopened.stored.method == method and len(reopened.stored.layers) == len(expected)
    for stem, W in expected.items():
        torch.testing.assert_close(reopened.model.get_submodule(stem).weight, W, rtol=0, atol=0)


def test_unsupported_format_is_one_line(tiny_model_dirs, tmp_path):
    folder = tmp_path / "bnb"
    folder.mkdir()
    for f in tiny_model_dirs["llama"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="bitsandbytes"):
        load_model(folder, device="cpu")
    cli = subprocess.run([sys.executable, "-m", "quantlab", "eval", str(folder)], capture_output=True, text=True)
    assert cli.returncode == 2
    assert cli.stderr.strip().count("\n") == 0 and "bitsandbytes" in cli.stderr and "Traceback" not in cli.stderr
