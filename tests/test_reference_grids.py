"""QuantLab's default symmetric integer grid equals compressed-tensors' own, bit for bit.

compressed-tensors (what llm-compressor quantizes with and vLLM loads) is the independent reference:
its ``calculate_qparams`` picks the scales (absmax / ((qmax - qmin) / 2), rounded to ``scale_dtype``)
and its ``quantize`` the codes. Weights are fp32, as the bundled model's: compressed-tensors divides
in the weight's dtype, so for bf16 weights its x / s is itself rounded to bf16 before the codes are
taken, while QuantLab divides in fp32 (see quantlab.numerics.primitives).
"""

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
from compressed_tensors.quantization.utils.helpers import calculate_qparams

from quantlab.numerics.formats import QuantFormat
from quantlab.numerics.primitives import dequantize, quantize

SCALE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def heavy_tailed(rows: int = 48, cols: int = 256, seed: int = 0) -> torch.Tensor:
    """Weights with outliers (Student-t, 3 degrees of freedom), plus rows whose absmax is negative."""
    w = torch.distributions.StudentT(3.0).sample((rows, cols)) * 0.02
    w[::3] = -w[::3]  # flip some rows so that both ends set the absmax in some rows
    return w


def reference(w: torch.Tensor, n_bits: int, group_size: int | None, scale_dtype: torch.dtype):
    """compressed-tensors' scales (rows, groups) and int8 codes (rows, cols) for an fp32 weight."""
    strategy = "group" if group_size else "channel"
    args = QuantizationArgs(num_bits=n_bits, type="int", symmetric=True, strategy=strategy,
                            group_size=group_size, scale_dtype=scale_dtype)
    blocks = w.reshape(w.shape[0], -1, group_size) if group_size else w.unsqueeze(1)  # (rows, groups, g)
    scale, zero_point = calculate_qparams(blocks.amin(dim=-1), blocks.amax(dim=-1), args)  # (rows, groups)
    codes = ct_quantize(w, scale, zero_point, args, dtype=torch.int8)
    return scale, codes, zero_point, args


@pytest.fixture(scope="module")
def real_weight(bundled_lm) -> torch.Tensor:
    return bundled_lm.model.model.layers[0].mlp.down_proj.weight.detach().float().clone()  # (256, 768)


@pytest.mark.parametrize("n_bits", [4, 8])
@pytest.mark.parametrize("group_size", [None, 128])
@pytest.mark.parametrize("scale_dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("source", ["heavy-tailed", "bundled"])
def test_codes_and_scales_equal_compressed_tensors(n_bits, group_size, scale_dtype, source, real_weight):
    torch.manual_seed(n_bits)
    w = heavy_tailed() if source == "heavy-tailed" else real_weight
    ref_scale, ref_codes, ref_zero, args = reference(w, n_bits, group_size, SCALE_DTYPES[scale_dtype])
    name = f"int{n_bits}-" + (f"g{group_size}" if group_size else "per-channel")
    qt = quantize(w, QuantFormat.parse(name, scale_dtype=scale_dtype))
    scale = qt.qparams.scale.reshape(ref_scale.shape)  # (rows, groups)
    assert scale.dtype == SCALE_DTYPES[scale_dtype]
    assert torch.equal(scale.float(), ref_scale.float())  # every scale, bit for bit
    assert torch.equal(qt.codes, ref_codes)  # every code
    assert torch.equal(ref_zero, torch.zeros_like(ref_zero))
    # The 16th level is in use (the most negative value of some blocks maps to -2^(b-1)).
    assert qt.codes.min().item() == -(2 ** (n_bits - 1)) and qt.codes.max().item() == 2 ** (n_bits - 1) - 1
    ct_values = ct_dequantize(ref_codes, ref_scale.float(), None, args)
    assert torch.equal(dequantize(qt), ct_values.to(torch.float32))


def test_the_restricted_option_differs_from_the_reference():
    w = heavy_tailed()
    ref_scale, ref_codes, _, _ = reference(w, 4, 128, torch.float16)
    qt = quantize(w, QuantFormat.parse("int4-g128-restricted"))
    assert qt.codes.min().item() >= -7 and not torch.equal(qt.codes, ref_codes)
    # absmax / 7 against absmax / 7.5: restricted steps are 7.5 / 7 times the reference's.
    ratio = qt.qparams.scale.float().reshape(ref_scale.shape) / ref_scale.float()
    assert ratio.mean().item() == pytest.approx(7.5 / 7, rel=1e-3)
