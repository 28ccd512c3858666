"""Bit-packing: hand-written layouts, round trips for every width, and sizes equal to real files."""

import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from quantlab.errors import FormatError
from quantlab.numerics.formats import QuantFormat
from quantlab.numerics.packing import (
    PackedWeight,
    from_unsigned,
    pack,
    pack_int32,
    pack_quantized,
    to_unsigned,
    unpack,
    unpack_int32,
    unpack_to_quantized,
)
from quantlab.numerics.primitives import dequantize, quantize


def u8(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8)


# --- layouts written out by hand -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "codes, n_bits, expected",
    [
        ([1, 2, 3], 4, [0x21, 0x03]),  # two per byte, the first in the low nibble; odd count pads with 0
        ([0, 1, 2, 3], 2, [0b11_10_01_00]),  # four per byte, lowest bits first
        ([5, 2, 7], 3, [213, 1]),  # 5 + 2*8 + 7*64 = 469 = 213 + 1*256: the third code spans two bytes
        ([31, 0, 1], 5, [31, 4]),  # bits 0-4 hold 31, bits 10-14 hold 1: byte 1 is 1 << 2
        ([200, 7], 8, [200, 7]),  # 8-bit codes are the bytes themselves
    ],
)
def test_pack_matches_hand_written_layouts(codes, n_bits, expected):
    packed = pack(torch.tensor(codes), n_bits)
    assert packed.dtype == torch.uint8 and packed.tolist() == expected
    assert unpack(packed, n_bits, len(codes)).tolist() == codes


def test_pack_int32_puts_the_first_code_in_the_lowest_bits():
    words = pack_int32(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9]]), 4)  # 9 codes -> 2 words, the last padded
    assert words.dtype == torch.int32 and words.shape == (1, 2)
    assert words[0, 0].item() == 0x87654321 - 2**32  # the top nibble 8 sets the sign bit of the int32
    assert words[0, 1].item() == 9
    assert pack_int32(torch.tensor([3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]), 2).tolist() == [3 + (1 << 30)]


def test_pack_int32_matches_compressed_tensors():
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    signed = torch.randint(-8, 8, (5, 37), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    fmt = QuantFormat.parse("int4")
    assert torch.equal(pack_int32(to_unsigned(signed, fmt), 4), helpers.pack_to_int32(signed, 4))


# --- round trips --------------------------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(n_bits=st.integers(2, 8), numel=st.integers(0, 67), seed=st.integers(0, 2**16))
def test_pack_round_trips_every_width_and_takes_exactly_ceil_bytes(n_bits, numel, seed):
    codes = torch.randint(0, 2**n_bits, (numel,), generator=torch.Generator().manual_seed(seed))
    packed = pack(codes, n_bits)
    assert packed.numel() == -(-numel * n_bits // 8)
    assert torch.equal(unpack(packed, n_bits, numel), codes.to(torch.uint8))


@pytest.mark.parametrize("n_bits", [2, 4, 8])
@pytest.mark.parametrize("cols", [1, 7, 16, 33])
def test_pack_int32_round_trips(n_bits, cols):
    codes = torch.randint(0, 2**n_bits, (3, cols), generator=torch.Generator().manual_seed(cols))
    words = pack_int32(codes, n_bits)
    assert words.shape == (3, -(-cols * n_bits // 32))
    assert torch.equal(unpack_int32(words, n_bits, cols), codes.to(torch.uint8))


@pytest.mark.parametrize("name", ["int2", "int3", "int4", "int5", "int6", "int7", "int8"])
@pytest.mark.parametrize("suffix, lowest", [("", 0), ("-restricted", 1)])
def test_signed_codes_offset_by_half_the_range_and_back(name, suffix, lowest):
    fmt = QuantFormat.parse(name + suffix)
    codes = torch.arange(fmt.qmin, fmt.qmax + 1, dtype=torch.int8)
    unsigned = to_unsigned(codes, fmt)
    assert unsigned.dtype == torch.uint8 and unsigned.min() == lowest and unsigned.max() == 2**fmt.n_bits - 1
    assert torch.equal(from_unsigned(unsigned, fmt), codes)


def test_fp8_codes_are_stored_as_their_bytes():
    fmt = QuantFormat.parse("fp8-e4m3")
    codes = torch.tensor([1.0, -2.5, 448.0]).to(torch.float8_e4m3fn)
    unsigned = to_unsigned(codes, fmt)
    assert unsigned.tolist() == [0x38, 0xC2, 0x7E]  # sign | 4 exponent bits (bias 7) | 3 mantissa bits
    assert torch.equal(from_unsigned(unsigned, fmt).float(), codes.float())


# --- bad input ----------------------------------------------------------------------------------------------
def test_bad_codes_and_buffers_are_format_errors():
    with pytest.raises(FormatError, match=r"\[0, 15\].*\[0, 16\]"):
        pack(torch.tensor([0, 16]), 4)
    with pytest.raises(FormatError, match="to_unsigned"):
        pack(torch.tensor([-1, 3]), 4)
    with pytest.raises(FormatError, match="integer codes"):
        pack(torch.tensor([0.5]), 4)
    with pytest.raises(FormatError, match=r"widths supported here are \[2, 3, 4, 5, 6, 7, 8\]"):
        pack(torch.tensor([1]), 9)
    with pytest.raises(FormatError, match=r"\[2, 4, 8\]"):
        pack_int32(torch.tensor([1]), 3)
    with pytest.raises(FormatError, match="take 2 uint8 bytes, got 3"):
        unpack(u8([1, 2, 3]), 4, 3)
    with pytest.raises(FormatError, match="int32 words per row"):
        unpack_int32(torch.zeros(1, 3, dtype=torch.int32), 4, 9)


# --- packed weights and their size --------------------------------------------------------------------------
PACKED_FORMATS = (
    "int2-g32", "int3-g16-asym", "int4-g32", "int4-g64-asym", "int5-per-channel-asym", "int6-g16", "int7-per-tensor",
    "int8", "int8-per-channel-asym", "nf4-g32", "fp8-e4m3", "fp8-e5m2-per-tensor",
)


@pytest.mark.parametrize("name", PACKED_FORMATS)
@pytest.mark.parametrize("scale_dtype", ["fp16", "bf16", "fp32"])
def test_packed_weight_round_trips_and_counts_what_storage_counts(name, scale_dtype):
    fmt = QuantFormat.parse(name, scale_dtype=scale_dtype)
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    qt = quantize(x, fmt)
    packed = pack_quantized(qt)
    assert packed.nbytes == fmt.storage(7, 64).total_bytes
    assert packed.scale.dtype == fmt.torch_scale_dtype
    back = unpack_to_quantized(packed)
    assert torch.equal(back.codes.view(torch.uint8), qt.codes.view(torch.uint8))
    assert torch.equal(dequantize(back), dequantize(qt)) and dequantize(back).dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["int4-g128-asym", "int3-g64", "int5-g64-asym", "nf4-g64", "fp8-e4m3", "int8"])
def test_size_accounting_equals_the_bytes_of_a_saved_safetensors_file(name, tmp_path):
    fmt = QuantFormat.parse(name)
    x = torch.randn(24, 256, generator=torch.Generator().manual_seed(5))
    packed = pack_quantized(quantize(x, fmt))
    path = tmp_path / "layer.safetensors"
    save_file(packed.to_tensors("model.layers.0.mlp.up_proj"), str(path), metadata={"format": fmt.name})
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    data_bytes = sum(end - begin for key, entry in header.items() if key != "__metadata__"
                     for begin, end in [entry["data_offsets"]])
    assert data_bytes == fmt.storage(24, 256).total_bytes == packed.nbytes
    assert len(raw) == 8 + header_len + data_bytes
    loaded = PackedWeight.from_tensors(load_file(str(path)), "model.layers.0.mlp.up_proj", (24, 256), fmt)
    assert torch.equal(dequantize(unpack_to_quantized(loaded)), fake_of(x, fmt))


def fake_of(x: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    return dequantize(quantize(x, fmt))


def test_packed_weight_rejects_mismatched_parts():
    fmt = QuantFormat.parse("int4-g32-asym")
    packed = pack_quantized(quantize(torch.randn(2, 32), fmt))
    with pytest.raises(FormatError, match="must be 32 uint8 bytes"):
        PackedWeight(packed.codes[:-1], packed.scale, packed.zero_point, (2, 32), fmt)
    with pytest.raises(FormatError, match="needs zero-points"):
        PackedWeight(packed.codes, packed.scale, None, (2, 32), fmt)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_packing_on_cuda_matches_cpu():
    codes = torch.randint(0, 8, (1001,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(pack(codes.cuda(), 3).cpu(), pack(codes, 3))
    assert torch.equal(unpack(pack(codes.cuda(), 3), 3, 1001).cpu(), codes.to(torch.uint8))
