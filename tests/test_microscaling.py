"""MXFP4/6/8, NVFP4 and FP8 block: exact storage, the element grids, and bit-exactness against
compressed-tensors 0.20's own calculate_qparams / quantize / dequantize for its presets."""

from __future__ import annotations

import pytest
import torch

from quantlab.errors import FormatError
from quantlab.numerics.formats import QuantFormat
from quantlab.numerics.minifloats import BLOCK_SPECS, E2M1, E2M3, E3M2, element_values, mx_exponent, round_to_element
from quantlab.numerics.packing import pack_quantized, unpack_to_quantized
from quantlab.numerics.primitives import dequantize, fake_quantize, quantize

ct_forward = pytest.importorskip("compressed_tensors.quantization.lifecycle.forward")
ct_schemes = pytest.importorskip("compressed_tensors.quantization.quant_scheme")
ct_utils = pytest.importorskip("compressed_tensors.quantization.utils")

# QuantLab name -> compressed-tensors preset whose weight arguments it reproduces
PRESETS = {"nvfp4": "NVFP4A16", "mxfp4": "MXFP4A16", "mxfp6-e2m3": "MXFP6A16", "mxfp8-e4m3": "MXFP8",
           "fp8-block": "FP8_BLOCK"}


@pytest.mark.parametrize("name, out_features, in_features, expected", [
    ("mxfp4", 4096, 4096, 4.25),
    ("mxfp6-e2m3", 4096, 4096, 6.25),
    ("mxfp6-e3m2", 64, 64, 6.25),
    ("mxfp8-e4m3", 4096, 4096, 8.25),
    ("nvfp4", 4096, 4096, 4 + 8 / 16 + 32 / 4096**2),
    ("nvfp4", 64, 32, 4 + 8 / 16 + 32 / 2048),
    ("fp8-block", 4096, 4096, 8 + 32 / 16384),
    ("fp8-block", 200, 256, 8 + 32 * 2 * 2 / (200 * 256)),  # a partial last tile of rows has its own scale
])
def test_bits_per_weight_are_exact(name, out_features, in_features, expected):
    assert QuantFormat.parse(name).bits_per_weight(in_features, out_features) == pytest.approx(expected, rel=0, abs=1e-12)


def test_names_and_fixed_fields():
    assert QuantFormat.parse("mxfp6").name == "mxfp6-e2m3" and QuantFormat.parse("MXFP8").name == "mxfp8-e4m3"
    with pytest.raises(FormatError, match="fixed block"):
        QuantFormat.parse("mxfp4-g64")
    with pytest.raises(FormatError, match="fixes n_bits"):
        QuantFormat(kind="nvfp4")
    with pytest.raises(FormatError, match="scaled-block formats are"):
        QuantFormat.parse("mxfp4-e3m2")


def test_e2m1_has_eight_magnitudes_and_rounds_ties_to_even():
    assert E2M1.magnitudes() == (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.01, 7.0, -2.6, -0.26])
    assert round_to_element(x, E2M1).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -3.0, -0.5]
    assert max(E2M3.magnitudes()) == 7.5 and max(E3M2.magnitudes()) == 28.0


def test_mx_scale_rounds_the_absmax_to_a_power_of_two_as_documented():
    absmax = torch.tensor([1.5, 1.7, 1.8, 3.3, 0.0])
    assert mx_exponent(absmax, E2M1).tolist() == [-2, -2, -1, -1, -127]


def _weights(case: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(256, 512, generator=gen) * torch.logspace(-3, 1, 512)  # columns from 1e-3 to 10
    if case == "outliers":
        W[5, 100], W[200, 7] = 40.0, -75.0
        W[3, :64] = 0  # all-zero blocks: the zero-scale replacement of each preset
    if case == "ties":  # values on and halfway between E2M1 levels of a unit scale
        W = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0]).repeat(256, 64) * torch.randint(
            -1, 2, (256, 512), generator=gen).float()
    if case == "bf16":
        W = W.to(torch.bfloat16).float()
    return W


def _ct_reference(W: torch.Tensor, preset: str):
    """compressed-tensors' own qparams, codes (element values) and dequantized weight."""
    args = ct_schemes.PRESET_SCHEMES[preset]["weights"]
    if args.block_structure:
        rows, cols = args.block_structure
        tiles = W.reshape(W.shape[0] // rows, rows, W.shape[1] // cols, cols)
        lo, hi = tiles.amin(dim=(1, 3)), tiles.amax(dim=(1, 3))
    else:
        groups = W.reshape(W.shape[0], -1, args.group_size)
        lo, hi = groups.amin(-1), groups.amax(-1)
    gscale = ct_utils.generate_gparam(W.min(), W.max()) if args.strategy == "tensor_group" else None
    scale, zero_point = ct_utils.calculate_qparams(lo, hi, args, global_scale=gscale)
    codes = ct_forward.quantize(W, scale, zero_point, args, global_scale=gscale)
    values = ct_forward.dequantize(codes, scale, zero_point, args, dtype=torch.float32, global_scale=gscale)
    return scale, gscale, codes, values


@pytest.mark.parametrize("case", ["plain", "outliers", "ties", "bf16"])
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_bit_exact_against_compressed_tensors(name, case):
    W = _weights(case)
    fmt = QuantFormat.parse(name)
    ct_scale, ct_global, ct_codes, ct_values = _ct_reference(W, PRESETS[name])
    qt = quantize(W, fmt)
    stored = qt.qparams.scale.float()[..., 0]  # (rows, groups)
    if name == "fp8-block":
        stored = stored[::128]  # the tile's scale, repeated over its 128 rows
    assert torch.equal(stored, ct_scale.float())
    if ct_global is not None:
        assert torch.equal(qt.qparams.global_scale.reshape(1), ct_global)
    assert torch.equal(dequantize(qt), ct_values)
    assert torch.equal(fake_quantize(W, fmt), ct_values)
    codes = qt.codes.float() if qt.codes.dtype.is_floating_point else element_values(qt.codes, BLOCK_SPECS[name].element)
    assert torch.equal(codes, ct_codes.float())  # the codes themselves: element values before the scale


@pytest.mark.parametrize("name", sorted(PRESETS) + ["mxfp6-e3m2"])
def test_packed_weight_round_trips_and_takes_what_storage_counts(name):
    W = _weights("outliers")[:200]  # fp8-block: a partial last tile of 72 rows
    fmt = QuantFormat.parse(name)
    qt = quantize(W, fmt)
    packed = pack_quantized(qt)
    assert packed.nbytes == fmt.storage(*W.shape).total_bytes
    assert torch.equal(dequantize(unpack_to_quantized(packed)), dequantize(qt))


def test_nvfp4_finer_scale_beats_mxfp4_on_real_like_weights():
    W = _weights("plain")
    err = {n: (fake_quantize(W, QuantFormat.parse(n)) - W).pow(2).sum().item() for n in ("nvfp4", "mxfp4")}
    assert err["nvfp4"] < err["mxfp4"]


@pytest.mark.parametrize("name", ["nvfp4", "mxfp4", "fp8-block"])
def test_gptq_on_scaled_block_formats_beats_rtn_on_its_own_loss(name):
    from quantlab.algorithms.gptq import gptq_quantize
    from quantlab.numerics.measures import output_error

    gen = torch.Generator().manual_seed(0)
    W = torch.randn(128, 256, generator=gen)
    X = torch.randn(512, 256, generator=gen) @ torch.randn(256, 256, generator=gen) * 0.2  # correlated inputs
    H = 2 * X.T @ X / X.shape[0]
    fmt = QuantFormat.parse(name)
    result = gptq_quantize(W, H, fmt)
    assert not result.fallback
    gptq_err = output_error(W, dequantize(result.quantized), H)
    rtn_err = output_error(W, fake_quantize(W, fmt), H)
    assert gptq_err < rtn_err
