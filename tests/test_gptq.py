"""GPTQ and RTN on small nn.Linear cases: exactness of the pieces, GPTQ <= RTN, act-order, static
groups, the Cholesky fallback, and the documented errors."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from quantlab.numerics.measures import output_error
from quantlab.recipe import GPTQParams
from quantlab.algorithms.gptq import gptq_quantize
from quantlab.calibrate.inputstats import accumulate_hessian
from quantlab.algorithms.rtn import rtn_quantize
from quantlab.calibrate.runner import effective_weight
from quantlab.errors import FormatError
from quantlab.numerics.formats import QuantFormat
from quantlab.numerics.primitives import choose_qparams, dequantize, quantize
from quantlab.models.quantized import QuantizedLinear


def correlated_inputs(n: int = 1024, features: int = 64, rank: int = 8, seed: int = 0) -> torch.Tensor:
    """Inputs with strongly correlated channels (low rank plus noise) and one outlier channel:
    the case where error compensation across columns pays off."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, rank, generator=g) @ torch.randn(rank, features, generator=g)
    X = X + 0.1 * torch.randn(n, features, generator=g)
    X[:, 5] *= 10
    return X  # (n, in)


def linear_and_hessian(out: int = 48, features: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    layer = nn.Linear(features, out)
    X = correlated_inputs(features=features, seed=seed)
    H, n = accumulate_hessian(X, torch.zeros(features, features), 0)
    return layer, X, H


def test_accumulate_hessian_is_2xtx_over_n_whatever_the_batching():
    X = correlated_inputs(n=300)
    H, n = torch.zeros(64, 64), 0
    for batch in X.split(70):  # uneven batches, one of 20 rows
        H, n = accumulate_hessian(batch.reshape(1, -1, 64), H, n)  # (batch, seq, in) inputs are flattened
    assert n == 300
    torch.testing.assert_close(H, 2 * X.T @ X / 300, rtol=1e-5, atol=1e-4)


def textbook_gptq(W: torch.Tensor, H: torch.Tensor, fmt: QuantFormat, damp: float = 0.01) -> torch.Tensor:
    """GPTQ without lazy batches: after each column, update every later column through U = chol(H⁻¹)ᵀ.

    Group scales are chosen from the updated columns when a group starts (fmt groups of g).
    """
    W = W.clone().float()
    n = W.shape[1]
    U = torch.linalg.cholesky(torch.linalg.inv(H + damp * torch.diag(H).mean() * torch.eye(n)), upper=True)
    column_fmt = QuantFormat.parse(f"int{fmt.n_bits}" + ("" if fmt.symmetric else "-asym"))
    g = fmt.granularity.group_size or n
    Q = torch.zeros_like(W)
    for j in range(n):
        if j % g == 0:
            qparams = choose_qparams(W[:, j : j + g], column_fmt)
        Q[:, j] = dequantize(quantize(W[:, j : j + 1], column_fmt, qparams))[:, 0]
        W[:, j + 1 :] -= torch.outer((W[:, j] - Q[:, j]) / U[j, j], U[j, j + 1 :])
    return Q


@pytest.mark.parametrize("name", ["int4", "int3-asym", "int4-g16", "int3-g32-asym"])
def test_lazy_batches_match_the_textbook_algorithm(name):
    layer, _, H = linear_and_hessian()
    fmt = QuantFormat.parse(name)
    expected = textbook_gptq(layer.weight.detach(), H, fmt)
    # The textbook loop is the paper's column order, without act-order.
    result = gptq_quantize(layer.weight, H, fmt, GPTQParams(block_size=16, act_order=False, static_groups=False))
    mismatched = (dequantize(result.quantized) - expected).abs() > 1e-5
    assert mismatched.float().mean() < 0.002  # fp32 summation order may flip a rare tie


@pytest.mark.parametrize("name", ["int4-g32", "int3", "int4-g16-asym", "int4-per-tensor", "nf4-g32", "int8"])
def test_gptq_output_error_is_below_rtn(name):
    layer, X, H = linear_and_hessian()
    fmt = QuantFormat.parse(name)
    W = layer.weight.detach()
    rtn = dequantize(rtn_quantize(W, fmt).quantized)
    result = gptq_quantize(W, H, fmt)
    gptq = effective_weight(result.quantized, result.perm)
    # Measured directly on the inputs, not through H: ||X W^T - X Ŵ^T||^2.
    err = lambda W_hat: (X @ (W - W_hat).T).pow(2).sum().item()  # noqa: E731
    assert err(gptq) < 0.8 * err(rtn)
    assert output_error(W, gptq, H) == pytest.approx(err(gptq) / (X @ W.T).pow(2).sum().item(), rel=1e-3)
    assert not result.fallback and result.damp == pytest.approx(0.01)


def test_gptq_returns_the_same_kind_of_codes_as_rtn():
    layer, _, H = linear_and_hessian()
    fmt = QuantFormat.parse("int4-g32-asym")
    result, rtn = gptq_quantize(layer.weight, H, fmt), rtn_quantize(layer.weight.detach(), fmt).quantized
    for a, b in ((result.quantized.codes, rtn.codes), (result.quantized.qparams.scale, rtn.qparams.scale),
                 (result.quantized.qparams.zero_point, rtn.qparams.zero_point)):
        assert a.dtype == b.dtype and a.shape == b.shape
    assert int(result.quantized.codes.min()) >= fmt.qmin and int(result.quantized.codes.max()) <= fmt.qmax
    # The codes are on their own grid: re-quantizing the dequantized weight with the same scales is exact.
    again = quantize(dequantize(result.quantized), fmt, result.quantized.qparams)
    assert torch.equal(again.codes, result.quantized.codes)
    assert not torch.equal(result.quantized.codes, rtn.codes)  # and GPTQ did change some of them


def test_act_order_with_groups_stores_permuted_columns_that_the_layer_undoes():
    layer, X, H = linear_and_hessian()
    fmt = QuantFormat.parse("int4-g16")
    result = gptq_quantize(layer.weight, H, fmt, GPTQParams(act_order=True, static_groups=False))
    assert result.perm is not None
    assert torch.equal(result.perm, torch.argsort(torch.diag(H), descending=True))
    assert result.perm[0] == 5  # the outlier channel has the largest diag(H) and goes first
    module = QuantizedLinear.from_linear(layer, result.quantized, in_perm=result.perm)
    expected = X @ effective_weight(result.quantized, result.perm).T + layer.bias
    torch.testing.assert_close(module(X), expected.detach(), rtol=1e-5, atol=1e-5)
    plain = effective_weight(gptq_quantize(layer.weight, H, fmt, GPTQParams(act_order=False, static_groups=False)).quantized)
    assert output_error(layer.weight, module.dequantized_weight(), H) <= output_error(layer.weight, plain, H) * 1.05


@pytest.mark.parametrize("act_order", [False, True])
def test_static_groups_use_the_original_weights_scales(act_order):
    layer, _, H = linear_and_hessian()
    fmt = QuantFormat.parse("int4-g16")
    result = gptq_quantize(layer.weight, H, fmt, GPTQParams(act_order=act_order, static_groups=True))
    assert result.perm is None  # contiguous groups in the original order: no permutation to store
    torch.testing.assert_close(result.quantized.qparams.scale, choose_qparams(layer.weight.detach(), fmt).scale)
    rtn = dequantize(rtn_quantize(layer.weight.detach(), fmt).quantized)
    assert output_error(layer.weight, dequantize(result.quantized), H) < output_error(layer.weight, rtn, H)


def test_defaults_are_llm_compressors_static_act_order():
    params = GPTQParams()
    assert (params.act_order, params.static_groups, params.damp, params.block_size) == (True, True, 0.01, 128)
    assert params.label == "static act-order, damp 0.01, block 128"
    layer, _, H = linear_and_hessian()
    fmt = QuantFormat.parse("int4-g16")
    default = gptq_quantize(layer.weight, H, fmt)
    static = gptq_quantize(layer.weight, H, fmt, GPTQParams(act_order=True, static_groups=True))
    assert default.perm is None and torch.equal(default.quantized.codes, static.quantized.codes)
    plain = gptq_quantize(layer.weight, H, fmt, GPTQParams(act_order=False, static_groups=False))
    assert not torch.equal(default.quantized.codes, plain.quantized.codes)


def test_block_size_does_not_change_the_result_without_groups():
    layer, _, H = linear_and_hessian()
    fmt = QuantFormat.parse("int4")
    a = gptq_quantize(layer.weight, H, fmt, GPTQParams(block_size=128))
    b = gptq_quantize(layer.weight, H, fmt, GPTQParams(block_size=7))  # lazy batches are an optimisation only
    assert (a.quantized.codes != b.quantized.codes).float().mean() < 0.01


def test_indefinite_hessian_falls_back_to_rtn_with_a_warning(caplog):
    layer, _, _ = linear_and_hessian()
    H = torch.eye(64)
    H[0, 1] = H[1, 0] = 10.0  # eigenvalues 11 and -9: no damping up to 100 x 0.01 x mean(diag) fixes that
    fmt = QuantFormat.parse("int4-g32")
    with caplog.at_level(logging.WARNING, logger="quantlab.algorithms.gptq"):
        result = gptq_quantize(layer.weight, H, fmt)
    assert result.fallback and result.perm is None
    assert torch.equal(result.quantized.codes, rtn_quantize(layer.weight.detach(), fmt).quantized.codes)
    assert any("RTN" in record.getMessage() for record in caplog.records)


def test_dead_inputs_get_zero_weight_and_an_all_zero_hessian_does_not_fail():
    layer, X, _ = linear_and_hessian()
    X[:, :8] = 0  # eight channels never active
    H, _ = accumulate_hessian(X, torch.zeros(64, 64), 0)
    result = gptq_quantize(layer.weight, H, QuantFormat.parse("int4-g32"))
    assert torch.all(dequantize(result.quantized)[:, :8] == 0) and not result.fallback
    empty = gptq_quantize(layer.weight, torch.zeros(64, 64), QuantFormat.parse("int4"))
    assert not empty.fallback and torch.all(dequantize(empty.quantized) == 0)


@pytest.mark.parametrize("quantize_fn", [
    lambda W, fmt: rtn_quantize(W, fmt),
    lambda W, fmt: gptq_quantize(W, torch.eye(W.shape[1]), fmt),
])
def test_indivisible_group_size_is_a_format_error(quantize_fn):
    W = torch.randn(8, 200)
    with pytest.raises(FormatError, match="does not divide the input dimension 200"):
        quantize_fn(W, QuantFormat.parse("int4-g128"))
