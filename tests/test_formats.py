"""Formats: parsing, validation with actionable errors, and exact size accounting."""

import pytest
import torch

from quantlab.errors import FormatError
from quantlab.numerics.formats import NF4_LEVELS, Granularity, QuantFormat, valid_group_sizes


@pytest.mark.parametrize(
    "text, kind, n_bits, symmetric, gran, group_size",
    [
        ("int4-g128", "int", 4, True, "group", 128),
        ("int3-g64-asym", "int", 3, False, "group", 64),
        ("int8", "int", 8, True, "channel", 0),
        ("INT8-per-tensor", "int", 8, True, "tensor", 0),
        ("int2-channel-asym", "int", 2, False, "channel", 0),
        ("fp8-e4m3", "fp8-e4m3", 8, True, "channel", 0),
        ("fp8-e5m2-per-tensor", "fp8-e5m2", 8, True, "tensor", 0),
        ("nf4", "nf4", 4, True, "group", 64),
        ("nf4-g32", "nf4", 4, True, "group", 32),
    ],
)
def test_parse_reads_every_part_of_the_name(text, kind, n_bits, symmetric, gran, group_size):
    fmt = QuantFormat.parse(text)
    assert (fmt.kind, fmt.n_bits, fmt.symmetric) == (kind, n_bits, symmetric)
    assert (fmt.granularity.kind, fmt.granularity.group_size) == (gran, group_size)


def test_parse_applies_overrides_and_name_round_trips():
    fmt = QuantFormat.parse("int4-g128-asym", scale_dtype="fp32", range_method="mse")
    assert (fmt.scale_dtype, fmt.range_method) == ("fp32", "mse")
    assert QuantFormat.parse(fmt.name) == QuantFormat.parse("int4-g128-asym")


@pytest.mark.parametrize(
    "text, needle",
    [("int9", "between 2 and 8"), ("int1-g64", "between 2 and 8"), ("fp8-e4m3-asym", "drop --asym"),
     ("nf4-per-tensor", "per-group or per-channel"), ("float16", "examples"), ("int4-g0", "positive")],
)
def test_bad_formats_say_what_to_do(text, needle):
    with pytest.raises(FormatError, match=needle):
        QuantFormat.parse(text)


@pytest.mark.parametrize(
    "kwargs, needle",
    [({"scale_dtype": "fp64"}, "scale dtype"), ({"range_method": "kl"}, "range method"),
     ({"percentile": 0.0}, "percentile"), ({"percentile": 100.5}, "percentile")],
)
def test_bad_settings_are_format_errors(kwargs, needle):
    with pytest.raises(FormatError, match=needle):
        QuantFormat(**kwargs)


def test_granularity_from_group_size_cli_convention():
    assert Granularity.from_group_size(0) == Granularity("channel")
    assert Granularity.from_group_size(-1) == Granularity("tensor")
    assert Granularity.from_group_size(32) == Granularity("group", 32)
    with pytest.raises(FormatError, match="-1 \\(per-tensor\\)"):
        Granularity.from_group_size(-2)
    with pytest.raises(FormatError, match="only meaningful"):
        Granularity("channel", 64)


def test_indivisible_group_size_names_the_valid_choices():
    choices = r"\[16, 32, 64, 128, 256, 512, 1024\]"
    with pytest.raises(FormatError, match=r"group size 100 does not divide .* 4096.*" + choices):
        QuantFormat.parse("int4-g100").storage(8, 4096)
    # No power of two from 16 divides 200: the smallest divisors are offered instead.
    assert valid_group_sizes(200) == [2, 4, 5, 8, 10, 20, 25, 40]
    with pytest.raises(FormatError, match=r"\[2, 4, 5, 8, 10, 20, 25, 40\]"):
        QuantFormat.parse("int4-g128").storage(8, 200)


def test_integer_grids_use_the_full_symmetric_range_by_default():
    assert (QuantFormat.parse("int4").qmin, QuantFormat.parse("int4").qmax) == (-8, 7)
    assert (QuantFormat.parse("int8").qmin, QuantFormat.parse("int8").qmax) == (-128, 127)
    assert QuantFormat.parse("int4").symmetric_divisor == 7.5
    assert QuantFormat.parse("int8").symmetric_divisor == 127.5
    assert (QuantFormat.parse("int3-asym").qmin, QuantFormat.parse("int3-asym").qmax) == (0, 7)
    with pytest.raises(FormatError, match="no integer grid"):
        QuantFormat.parse("nf4").qmax


def test_restricted_range_is_an_option_and_a_name_suffix():
    fmt = QuantFormat.parse("int4-g128-restricted")
    assert fmt.symmetric_range == "restricted" and (fmt.qmin, fmt.qmax) == (-7, 7) and fmt.symmetric_divisor == 7
    assert (QuantFormat.parse("int8-restricted").qmin, QuantFormat.parse("int8-restricted").qmax) == (-127, 127)
    assert fmt.name == "int4-g128-restricted" and QuantFormat.parse(fmt.name) == fmt
    assert QuantFormat.parse("int4-g128").name == "int4-g128"  # the default range adds nothing to the name
    # Same storage: the range changes which codes are used, not how many bits they take.
    assert fmt.storage(64, 256) == QuantFormat.parse("int4-g128").storage(64, 256)
    for text in ("int4-g128-asym-restricted", "nf4-g64-restricted", "fp8-e4m3-restricted"):
        with pytest.raises(FormatError, match="symmetric integers only"):
            QuantFormat.parse(text)
    with pytest.raises(FormatError, match="symmetric range must be one of"):
        QuantFormat(symmetric_range="half")


def test_nf4_levels_are_sorted_with_exact_ends_and_zero():
    levels = torch.tensor(NF4_LEVELS)
    assert len(NF4_LEVELS) == 16 and torch.all(levels[1:] > levels[:-1])
    assert (NF4_LEVELS[0], NF4_LEVELS[7], NF4_LEVELS[15]) == (-1.0, 0.0, 1.0)


def test_bits_per_weight_int4_g128_asym_is_the_issue_example():
    # 4 bits + one fp16 scale and one 4-bit zero-point per 128 weights = 4 + 16/128 + 4/128.
    fmt = QuantFormat.parse("int4-g128-asym")
    assert fmt.bits_per_weight(4096) == pytest.approx(4 + 16 / 128 + 4 / 128, abs=1e-12)
    assert round(fmt.bits_per_weight(4096), 3) == 4.156


@pytest.mark.parametrize(
    "text, scale_dtype, out_f, in_f, weight, scale, zero",
    [
        ("int4-g128-asym", "fp16", 4096, 4096, 4096 * 4096 // 2, 4096 * 32 * 2, 4096 * 32 // 2),
        ("int3-g64", "bf16", 10, 192, 720, 10 * 3 * 2, 0),  # 1920 values * 3 bits = 720 bytes
        ("int5-g32-asym", "fp32", 3, 96, 180, 9 * 4, 6),  # 9 zero-points * 5 bits = 45 bits -> 6 bytes
        ("int8", "fp16", 7, 33, 231, 14, 0),
        ("int2-per-tensor-asym", "fp32", 5, 7, 9, 4, 1),  # 35 values * 2 bits = 70 bits -> 9 bytes
        ("nf4-g64", "fp16", 3, 128, 192, 12, 0),
        ("fp8-e4m3", "fp32", 6, 10, 60, 24, 0),
        ("fp8-e5m2-per-tensor", "fp16", 6, 10, 60, 2, 0),
    ],
)
def test_storage_counts_every_byte(text, scale_dtype, out_f, in_f, weight, scale, zero):
    storage = QuantFormat.parse(text, scale_dtype=scale_dtype).storage(out_f, in_f)
    assert (storage.weight_bytes, storage.scale_bytes, storage.zero_point_bytes) == (weight, scale, zero)
    assert storage.total_bytes == weight + scale + zero
    assert storage.bits_per_weight == 8 * (weight + scale + zero) / (out_f * in_f)
