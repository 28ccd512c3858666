"""Quantization primitives against hand-written references, plus properties that must always hold."""

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantlab.numerics import kernels
from quantlab.errors import FormatError, QuantizationError
from quantlab.numerics.formats import FP8_DTYPES, NF4_LEVELS, QuantFormat
from quantlab.numerics.primitives import (
    check_format_fits,
    choose_qparams,
    clipped_mask,
    dequantize,
    error_report,
    fake_quantize,
    quantize,
    to_blocks,
)

FORMATS = (
    "int2-per-tensor", "int3-g16-asym", "int4-g16", "int4-g32-asym", "int5-per-channel", "int6-g16-asym",
    "int7-per-tensor-asym", "int8", "int8-g32-asym", "nf4-g16", "nf4-per-channel", "fp8-e4m3",
    "fp8-e5m2-per-tensor",
)
SYMMETRIC = tuple(name for name in FORMATS if not name.endswith("asym"))
RESTRICTED = tuple(f"{name}-restricted" for name in SYMMETRIC if name.startswith("int"))


def weights(rows=8, cols=64, seed=0, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05).to(dtype)


def fp16(value: float) -> float:
    return torch.tensor(value, dtype=torch.float16).item()


# --- exact references -------------------------------------------------------------------------------------
def test_int4_symmetric_per_tensor_matches_the_hand_computation():
    x = torch.tensor([0.0, 0.5, -1.0, 0.7])
    qt = quantize(x, QuantFormat.parse("int4-per-tensor"))
    scale = fp16(1 / 7.5)  # absmax 1 over (qmax - qmin) / 2 = 7.5, stored in fp16 (rounded down)
    assert scale == 0.13330078125 and qt.qparams.scale.item() == scale
    # 0.5 / s = 3.751 -> 4, -1 / s = -7.502 -> -8 (the full range's 16th level), 0.7 / s = 5.251 -> 5
    assert qt.codes.tolist() == [0, 4, -8, 5]
    assert torch.equal(dequantize(qt), torch.tensor([0.0, 4.0, -8.0, 5.0]) * scale)


def test_int4_full_range_clips_the_positive_absmax_by_half_a_step():
    qt = quantize(torch.tensor([1.0, -0.5]), QuantFormat.parse("int4-per-tensor", scale_dtype="fp32"))
    scale = torch.tensor(1 / 7.5).item()
    assert qt.qparams.scale.item() == scale and qt.codes.tolist() == [7, -4]  # 1 / s = 7.5 clamps to 7
    assert dequantize(qt)[0].item() == pytest.approx(1.0 - scale / 2)


def test_int4_restricted_per_tensor_matches_the_hand_computation():
    x = torch.tensor([0.0, 0.5, -1.0, 0.7])
    qt = quantize(x, QuantFormat.parse("int4-per-tensor-restricted"))
    scale = fp16(1 / 7)  # absmax 1 over qmax 7, stored in fp16
    assert scale == 0.142822265625 and qt.qparams.scale.item() == scale
    assert qt.codes.tolist() == [0, 4, -7, 5]  # 0.5 / s = 3.5009 -> 4, 0.7 / s = 4.901 -> 5
    assert torch.equal(dequantize(qt), torch.tensor([0.0, 4.0, -7.0, 5.0]) * scale)


def test_int4_asymmetric_zero_point_matches_the_hand_computation():
    fmt = QuantFormat.parse("int4-per-tensor-asym", scale_dtype="fp32")
    qt = quantize(torch.tensor([-1.0, 0.0, 0.5, 2.0]), fmt)
    scale = torch.tensor(3 / 15, dtype=torch.float32)  # (max - min) / (2^4 - 1)
    assert qt.qparams.scale.item() == scale.item() and qt.qparams.zero_point.item() == 5  # round(1 / 0.2)
    assert qt.codes.tolist() == [0, 5, 7, 15]
    assert torch.equal(dequantize(qt), torch.tensor([-5.0, 0.0, 2.0, 10.0]) * scale)


def test_int3_asymmetric_zero_point_shifts_the_grid():
    # min -2, max 4: s = 6/7, z = round(2 / s) = round(2.33) = 2, so the grid is (q - 2) * s.
    fmt = QuantFormat.parse("int3-per-channel-asym", scale_dtype="fp32")
    qt = quantize(torch.tensor([[-2.0, 1.0, 4.0, 0.0]]), fmt)
    scale = torch.tensor(6 / 7, dtype=torch.float32)
    assert qt.qparams.zero_point.flatten().tolist() == [2] and qt.codes.tolist() == [[0, 3, 7, 2]]
    assert torch.equal(dequantize(qt), torch.tensor([[-2.0, 1.0, 5.0, 0.0]]) * scale)


def test_asymmetric_range_always_contains_zero_and_rounds_half_to_even():
    fmt = QuantFormat.parse("int2-per-tensor-asym", scale_dtype="fp32")
    qt = quantize(torch.tensor([0.5, 1.0, 1.5, 3.0]), fmt)  # min is widened to 0: s = 3/3, z = 0
    assert qt.qparams.scale.item() == 1.0 and qt.qparams.zero_point.item() == 0
    assert qt.codes.tolist() == [0, 1, 2, 3]  # 0.5 -> 0 and 1.5 -> 2: ties to even, as torch.round


def test_nf4_reproduces_its_levels_and_rounds_to_the_nearest_one():
    fmt = QuantFormat.parse("nf4-g16", scale_dtype="fp32")
    levels = torch.tensor(NF4_LEVELS)
    qt = quantize(levels * 0.5, fmt)
    assert qt.qparams.scale.item() == 0.5 and qt.codes.tolist() == list(range(16))
    assert torch.equal(dequantize(qt), levels * 0.5)
    # Midpoints: (0.5626 + 0.7230) / 2 = 0.6428, (-0.0911 + 0) / 2 = -0.0455, (0 + 0.0796) / 2 = 0.0398.
    x = torch.tensor([0.6, 0.65, -0.05, 0.04, 1.0, -1.0] + [0.0] * 10)
    codes = quantize(x, fmt).codes
    assert codes[:6].tolist() == [13, 14, 6, 8, 15, 0] and set(codes[6:].tolist()) == {7}


@pytest.mark.parametrize(
    "name, x, expected",
    [
        # e4m3: 3 mantissa bits, max 448. 0.3 = 1.2 * 2^-2 rounds to 1.25 * 2^-2.
        ("fp8-e4m3-per-tensor", [448.0, 1.0, -2.5, 0.3], [448.0, 1.0, -2.5, 0.3125]),
        # e5m2: 2 mantissa bits, max 57344. 1000 = 1.95 * 2^9 rounds to 2 * 2^9.
        ("fp8-e5m2-per-tensor", [57344.0, 0.3, -3.0, 1000.0], [57344.0, 0.3125, -3.0, 1024.0]),
    ],
)
def test_fp8_values_match_the_float8_grid(name, x, expected):
    qt = quantize(torch.tensor(x), QuantFormat.parse(name, scale_dtype="fp32"))
    assert qt.qparams.scale.item() == 1.0 and qt.codes.dtype == FP8_DTYPES[name[:8]]
    assert dequantize(qt).tolist() == expected


def test_blocks_follow_the_granularity():
    x = torch.zeros(6, 64)
    assert to_blocks(x, QuantFormat.parse("int4-per-tensor")).shape == (1, 1, 384)
    assert to_blocks(x, QuantFormat.parse("int4-per-channel")).shape == (6, 1, 64)
    assert to_blocks(x, QuantFormat.parse("int4-g16")).shape == (6, 4, 16)
    assert choose_qparams(x, QuantFormat.parse("int4-g16-asym")).zero_point.shape == (6, 4, 1)


# --- agreement between code paths ---------------------------------------------------------------------------
def reference_fake(x: torch.Tensor, fmt: QuantFormat, qparams) -> torch.Tensor:
    """The formulas of the issue, written out plainly, for the same qparams."""
    blocks, scale = to_blocks(x, fmt), qparams.scale.float()
    if fmt.kind == "int":
        zero = qparams.zero_point if qparams.zero_point is not None else 0
        codes = torch.clamp(torch.round(blocks / scale) + zero, fmt.qmin, fmt.qmax)
        values = (codes - zero) * scale
    elif fmt.kind == "nf4":
        levels = torch.tensor(NF4_LEVELS)
        midpoints = (levels[1:] + levels[:-1]) / 2
        values = levels[((blocks / scale).unsqueeze(-1) > midpoints).sum(-1)] * scale
    else:
        limit = torch.finfo(FP8_DTYPES[fmt.kind]).max
        values = (blocks / scale).clamp(-limit, limit).to(FP8_DTYPES[fmt.kind]).float() * scale
    return values.reshape(x.shape).to(x.dtype)


@pytest.mark.parametrize("name", FORMATS)
def test_fake_quantize_equals_the_reference_and_dequantize_of_quantize(name):
    fmt = QuantFormat.parse(name)
    x = weights()
    qparams = choose_qparams(x, fmt)
    out = fake_quantize(x, fmt)
    assert torch.equal(out, reference_fake(x, fmt, qparams))
    assert torch.equal(out, dequantize(quantize(x, fmt)))
    error, bound = (out - x).abs(), error_bound(x, fmt, qparams)
    inside = ~clipped_mask(x, fmt, qparams)
    # Asymmetric min-max may clip an end by the rounding of its zero-point and of the stored scale.
    assert (error[inside] <= bound[inside]).all() and (error <= 2 * bound).all()


def error_bound(x: torch.Tensor, fmt: QuantFormat, qparams) -> torch.Tensor:
    """Half a grid step at each value of ``x`` (for values inside the range), in ``x``'s shape."""
    scale = qparams.scale.float().expand_as(to_blocks(x, fmt)).reshape(x.shape)
    if fmt.kind in FP8_DTYPES:  # >= 2 mantissa bits: half a step is <= 1/8 relative, plus the subnormal steps
        return x.abs() / 8 + scale / 64
    return scale * (0.5 if fmt.kind == "int" else 0.16)  # NF4's widest gap is 0.304 (-1 to -0.696) times s


# --- idempotence ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FORMATS)
def test_requantizing_with_the_same_qparams_changes_nothing(name):
    fmt = QuantFormat.parse(name)
    x = weights(seed=1)
    qparams = choose_qparams(x, fmt)
    once = fake_quantize(x, fmt, qparams)
    assert torch.equal(fake_quantize(once, fmt, qparams), once)
    codes_again, codes = quantize(once, fmt, qparams).codes, quantize(x, fmt, qparams).codes
    assert torch.equal(codes_again.view(torch.uint8), codes.view(torch.uint8))


@pytest.mark.parametrize("name", RESTRICTED + tuple(n for n in SYMMETRIC if not n.startswith("int")))
def test_restricted_and_float_formats_are_idempotent_with_fresh_qparams(name):
    fmt = QuantFormat.parse(name)
    once = fake_quantize(weights(seed=2), fmt)
    assert torch.equal(choose_qparams(once, fmt).scale, choose_qparams(weights(seed=2), fmt).scale)
    assert torch.equal(fake_quantize(once, fmt), once)


def test_full_range_min_max_is_not_idempotent_as_documented():
    # s = 7.5 / 7.5 = 1: -7.5 -> -8 (ties to even), so the second pass sees absmax 8 and picks s = 8 / 7.5.
    fmt = QuantFormat.parse("int4-per-tensor", scale_dtype="fp32")
    once = fake_quantize(torch.tensor([-7.5, 1.0]), fmt)
    assert once.tolist() == [-8.0, 1.0]
    assert choose_qparams(once, fmt).scale.item() == pytest.approx(8 / 7.5)
    assert not torch.equal(fake_quantize(once, fmt), once)


def test_asymmetric_min_max_is_not_idempotent_as_documented():
    # s = 1, z = round(0.5) = 0 (ties to even): -0.5 -> 0 and 2.5 -> 2 leave the top code 3 unused,
    # so the second pass sees the range [0, 2], picks s = 2/3, and 1 moves to round(1.5) * 2/3.
    fmt = QuantFormat.parse("int2-per-tensor-asym", scale_dtype="fp32")
    once = fake_quantize(torch.tensor([-0.5, 1.0, 2.5]), fmt)
    assert once.tolist() == [0.0, 1.0, 2.0]
    twice = fake_quantize(once, fmt)
    assert twice[1].item() == pytest.approx(4 / 3) and (twice[0].item(), twice[2].item()) == (0.0, 2.0)


# --- degenerate rows ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FORMATS)
def test_all_zero_tensor_gives_zeros_without_nan(name):
    fmt = QuantFormat.parse(name)
    qparams = choose_qparams(torch.zeros(4, 32), fmt)
    assert torch.isfinite(qparams.scale).all() and (qparams.scale > 0).all()
    assert torch.equal(fake_quantize(torch.zeros(4, 32), fmt), torch.zeros(4, 32))


@pytest.mark.parametrize("name", FORMATS)
def test_constant_and_zero_rows_stay_within_half_a_step(name):
    fmt = QuantFormat.parse(name)
    x = torch.stack([torch.full((32,), 0.3), torch.full((32,), -2.0), torch.zeros(32), weights(1, 32)[0]])
    qparams = choose_qparams(x, fmt)
    out = fake_quantize(x, fmt, qparams)
    assert torch.isfinite(out).all() and torch.equal(out[2], torch.zeros(32))
    bound = error_bound(x, fmt, qparams) * (1.001 if fmt.symmetric else 2)
    if fmt.kind == "int" and fmt.symmetric:  # the full range clamps a positive absmax (at 7.5 s at INT4) to 7 s:
        # half a step, plus what the scale's rounding to fp16 adds (7.5 s times fp16's relative error 2^-11)
        bound = bound + error_bound(x, fmt, qparams) * 2 * fmt.symmetric_divisor * 2.0**-11
    assert ((out - x).abs() <= bound).all()


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_rows_raise_a_quantization_error(name, method, bad):
    fmt = QuantFormat.parse(name, range_method=method, percentile=90.0)
    x = weights(4, 32)
    x[2, 3] = bad  # percentile 90 of a row would step over a single bad value: it must still be caught
    with pytest.raises(QuantizationError, match="NaN or Inf"):
        fake_quantize(x, fmt)


def test_nan_with_given_qparams_raises_for_codes_and_passes_through_fake_quantize():
    fmt = QuantFormat.parse("int4-g16")
    x = weights(2, 32)
    qparams = choose_qparams(x, fmt)
    x[1, 0] = float("nan")
    with pytest.raises(QuantizationError, match="NaN"):
        quantize(x, fmt, qparams)
    out = fake_quantize(x, fmt, qparams)
    assert torch.isnan(out[1, 0]) and torch.isfinite(out).sum() == x.numel() - 1


def test_scale_overflowing_fp16_asks_for_a_wider_scale_dtype():
    x = torch.tensor([[1e6, 1.0]])  # s = 1e6 / 7.5 is beyond fp16's 65504
    with pytest.raises(QuantizationError, match="bf16"):
        fake_quantize(x, QuantFormat.parse("int4"))
    # 1e6 / s = 7.5 clamps to 7 in the full range: 7 / 7.5 of 1e6, to bf16's precision.
    assert fake_quantize(x, QuantFormat.parse("int4", scale_dtype="bf16"))[0, 0].item() == pytest.approx(1e6 * 7 / 7.5, rel=0.01)


def test_indivisible_group_size_is_a_format_error_naming_valid_choices():
    with pytest.raises(FormatError, match=r"group size 128 does not divide .* 96.*\[16, 32\]"):
        fake_quantize(torch.zeros(4, 96), QuantFormat.parse("int4-g128"))
    with pytest.raises(FormatError, match=r"\[16, 32\]"):
        fake_quantize(torch.zeros(4, 96), QuantFormat.parse("int4-g40"))
    with pytest.raises(FormatError, match="empty"):
        check_format_fits((0, 16), QuantFormat.parse("int4"))


# --- dtypes and inputs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_output_dtype_follows_input_and_input_is_never_modified(name, dtype):
    fmt = QuantFormat.parse(name)
    x = weights(dtype=dtype).reshape(2, 4, 64)  # N-D: rows are the leading dims
    before = x.clone()
    out = fake_quantize(x, fmt)
    qt = quantize(x, fmt)
    assert out.dtype == dtype and out.shape == x.shape and dequantize(qt).dtype == dtype
    assert torch.equal(x, before)
    # The maths runs in fp32 whatever the input: the result is the fp32 result, cast once.
    assert torch.equal(out, fake_quantize(x.float(), fmt).to(dtype))


# --- properties (hypothesis) ------------------------------------------------------------------------------
@st.composite
def int_cases(draw):
    n_bits = draw(st.integers(2, 8))
    symmetric = draw(st.booleans())
    restricted = symmetric and draw(st.booleans())
    granularity = draw(st.sampled_from(["per-tensor", "per-channel", "g4", "g8"]))
    scale_dtype = draw(st.sampled_from(["fp16", "bf16", "fp32"]))
    rows, cols = draw(st.integers(1, 3)), draw(st.sampled_from([8, 16, 24]))
    values = draw(st.lists(st.floats(-1e3, 1e3, width=32, allow_subnormal=False), min_size=rows * cols,
                           max_size=rows * cols))
    name = f"int{n_bits}-{granularity}" + ("" if symmetric else "-asym") + ("-restricted" if restricted else "")
    return QuantFormat.parse(name, scale_dtype=scale_dtype), torch.tensor(values).reshape(rows, cols)


@settings(max_examples=150, deadline=None)
@given(int_cases())
def test_error_is_at_most_half_a_step_inside_the_range_and_values_lie_on_the_grid(case):
    fmt, x = case
    qparams = choose_qparams(x, fmt)
    out = fake_quantize(x, fmt, qparams)
    blocks, out_blocks = to_blocks(x, fmt), to_blocks(out, fmt)  # (rows, groups, g)
    scale = qparams.scale.float().expand_as(blocks)
    zero = (qparams.zero_point if qparams.zero_point is not None else torch.zeros(1)).expand_as(blocks)
    inside = ~to_blocks(clipped_mask(x, fmt, qparams), fmt).bool()
    # fp32 slack: x / s and q * s each round once (relative 2^-24 of at most 255 steps).
    slack = scale * 1e-4 + blocks.abs() * 1e-6
    assert ((blocks - out_blocks).abs() <= scale / 2 + slack)[inside].all()
    normal = (qparams.scale.float() >= torch.finfo(fmt.torch_scale_dtype).tiny).expand_as(inside)
    if fmt.restricted:  # min-max never clips a restricted grid while the stored scale keeps its precision
        assert inside[normal].all()
    elif fmt.symmetric:  # the full range clips only the top (x / s >= qmax + 1/2), by half a step and
        # the rounding of the stored scale (7.5 s times the dtype's relative error, doubled for slack)
        clipped = ~inside & normal
        eps = torch.finfo(fmt.torch_scale_dtype).eps
        bound = scale * (0.5 + 2 * fmt.symmetric_divisor * eps) + slack
        assert (blocks[clipped] > 0).all() and ((blocks - out_blocks).abs() <= bound)[clipped].all()
    steps = out_blocks / scale + zero  # grid points are (q - z) * s with integer q in [qmin, qmax]
    assert ((steps - steps.round()).abs() <= 1e-4).all()
    assert ((steps.round() >= fmt.qmin) & (steps.round() <= fmt.qmax)).all()


# --- range methods --------------------------------------------------------------------------------------
def test_percentile_and_mse_clip_heavy_tails_for_lower_error_than_min_max():
    torch.manual_seed(0)
    x = torch.distributions.StudentT(3.0).sample((32, 256))  # heavy tails: a few large values per row
    reports = {method: error_report(x, QuantFormat.parse("int3-restricted", range_method=method, percentile=99.0))
               for method in ("minmax", "percentile", "mse")}
    assert reports["minmax"].clipped_fraction == 0.0 and reports["minmax"].clipping_mse == 0.0
    # The full range's min-max clips at most the largest positive value of a row, by half a step.
    full = error_report(x, QuantFormat.parse("int3"))
    assert full.clipped_fraction <= 1 / 256 and full.clipping_mse < 0.01 * full.mse
    for method in ("percentile", "mse"):
        report = reports[method]
        assert 0.0 < report.clipped_fraction < 0.05 and report.clipping_mse > 0.0
        assert report.mse < 0.7 * reports["minmax"].mse
        assert report.clipping_mse + report.rounding_mse == pytest.approx(report.mse)
    ratios = choose_qparams(x, QuantFormat.parse("int3", range_method="mse")).clip_ratio
    assert ratios.min() < 1.0 and ratios.max() <= 1.0


# --- fused kernels ----------------------------------------------------------------------------------------
def test_nf4_select_chains_for_the_compiler_equal_bucketize():
    # Run eagerly here (no compile): the select chains must give bucketize's answer bit for bit,
    # at the midpoints themselves, beyond +-1, and on random values.
    levels = torch.tensor(NF4_LEVELS)
    midpoints = (levels[1:] + levels[:-1]) / 2
    extra = torch.cat([midpoints, levels, torch.tensor([-3.0, 3.0, 0.0])])
    blocks = torch.cat([torch.randn(4 * 64 - extra.numel(), generator=torch.Generator().manual_seed(0)), extra])
    blocks, scale = blocks.reshape(4, 1, 64), torch.tensor([[[1.0]], [[0.5]], [[2.0]], [[1.0]]])
    assert torch.equal(kernels.nf4_codes_select(blocks, scale, midpoints), kernels.nf4_codes(blocks, scale, midpoints))
    assert torch.equal(kernels.fake_nf4_select(blocks, scale, midpoints, levels),
                       kernels.fake_nf4(blocks, scale, midpoints, levels))


def test_small_tensors_never_compile_in_auto_mode(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.compile must not run for small tensors")

    monkeypatch.setattr(torch, "compile", refuse)
    monkeypatch.setattr(kernels, "_mode", "auto")
    monkeypatch.setattr(kernels, "_compiled", {})
    fake_quantize(weights(), QuantFormat.parse("int4-g16"))


def test_failing_compiler_falls_back_to_eager_with_a_warning(monkeypatch, caplog):
    def broken_compile(fn, **kwargs):
        def call(*args):
            raise RuntimeError("no C compiler")

        return call

    x, fmt = weights(), QuantFormat.parse("nf4-g16")
    expected = fake_quantize(x, fmt)
    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(kernels, "_mode", "always")
    monkeypatch.setattr(kernels, "_compiled", {})
    with caplog.at_level(logging.WARNING, logger="quantlab.numerics.kernels"):
        assert torch.equal(fake_quantize(x, fmt), expected)
    assert "no C compiler" in caplog.text and kernels.fused_mode() == "never"
    with pytest.raises(FormatError, match="fused mode"):
        kernels.set_fused_mode("sometimes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", FORMATS)
def test_cuda_matches_cpu(name):
    fmt = QuantFormat.parse(name)
    x = weights()
    on_gpu = fake_quantize(x.cuda(), fmt)
    assert on_gpu.is_cuda
    torch.testing.assert_close(on_gpu.cpu(), fake_quantize(x, fmt), rtol=0, atol=1e-6)
