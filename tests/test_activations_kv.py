"""Activation quantization (observers, per-token vs per-tensor) and KV-cache quantization."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from quantlab.calibrate.activations import ActivationQuantizer, calibrated_quantizer, fake_quantize_activation, observe
from quantlab.recipe import ActSpec, KVSpec
from quantlab.errors import FormatError
from quantlab.evaluation import EvalConfig, perplexity
from quantlab.algorithms.kvcache import apply_kv_quantization, fake_quantize_kv, kv_quantized_view, remove_kv_quantization
from quantlab.numerics.formats import QuantFormat
from quantlab.numerics.primitives import quantize
from quantlab.models.quantized import QuantizedLinear

STATIC = {name: ActSpec(8, "static", name, "per-tensor") for name in ("minmax", "percentile", "mse")}
DYNAMIC_TOKEN = ActSpec(8, "dynamic", granularity="per-token")
DYNAMIC_TENSOR = ActSpec(8, "dynamic", granularity="per-tensor")


def _relative_error(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    return ((x_hat - x).pow(2).sum() / x.pow(2).sum()).item()


def test_minmax_observer_is_absmax_over_qmax():
    batches = [torch.tensor([[1.0, -2.0], [0.5, 0.25]]), torch.tensor([[3.0, -6.35]])]
    assert observe(batches, STATIC["minmax"]) == pytest.approx(6.35 / 127)
    int4 = ActSpec(4, "static", "minmax", "per-tensor")
    assert observe(batches, int4) == pytest.approx(6.35 / 7)


def test_percentile_and_mse_observers_clip_the_tail_for_a_lower_error():
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((8, 256, 64))
    spec4 = {name: ActSpec(4, "static", name, "per-tensor") for name in STATIC}
    scales = {name: observe([x], spec) for name, spec in spec4.items()}
    assert scales["percentile"] < scales["minmax"] and scales["mse"] < scales["minmax"]
    errors = {name: _relative_error(fake_quantize_activation(x, spec4[name], scales[name]), x) for name in scales}
    assert errors["mse"] < errors["minmax"]
    assert errors["mse"] <= errors["percentile"] * 1.05  # MSE is what the mse observer minimises


def test_static_quantization_clips_beyond_the_calibrated_range():
    x = torch.tensor([[0.5, -1.0, 10.0]])
    out = fake_quantize_activation(x, STATIC["minmax"], static_scale=1.0 / 127)
    assert out.tolist() == [[pytest.approx(0.5, abs=0.5 / 127), -1.0, 1.0]]
    with pytest.raises(FormatError, match="calibrated scale"):
        fake_quantize_activation(x, STATIC["minmax"])


def test_per_token_scales_isolate_an_outlier_token():
    torch.manual_seed(1)
    x = torch.randn(2, 16, 32)
    x[0, 3] *= 100  # one token 100x larger: per-tensor spends the whole range on it
    token_error = _relative_error(fake_quantize_activation(x, DYNAMIC_TOKEN), x)
    tensor_error = _relative_error(fake_quantize_activation(x, DYNAMIC_TENSOR), x)
    rest = torch.ones(2, 16, dtype=torch.bool)
    rest[0, 3] = False
    small = x[rest]
    assert _relative_error(fake_quantize_activation(x, DYNAMIC_TOKEN)[rest], small) < 1e-4
    assert _relative_error(fake_quantize_activation(x, DYNAMIC_TENSOR)[rest], small) > 100 * token_error
    assert token_error < tensor_error
    assert fake_quantize_activation(x, DYNAMIC_TOKEN).shape == x.shape


def test_activation_quantizer_plugs_into_quantized_linear():
    torch.manual_seed(2)
    linear = nn.Linear(32, 8)
    x = torch.randn(4, 5, 32)
    quantizer = calibrated_quantizer(STATIC["minmax"], [x])
    assert isinstance(quantizer, ActivationQuantizer) and quantizer.static_scale == pytest.approx(x.abs().max().item() / 127)
    fmt = QuantFormat.parse("int8")
    weight_only = QuantizedLinear.from_linear(linear, quantize(linear.weight.detach(), fmt))
    w8a8 = QuantizedLinear.from_linear(linear, quantize(linear.weight.detach(), fmt), act_quantizer=quantizer)
    reference = linear(x).detach()
    y_w8, y_w8a8 = weight_only(x), w8a8(x)
    assert not torch.equal(y_w8, y_w8a8)
    assert _relative_error(y_w8a8, reference) < 1e-3
    with pytest.raises(FormatError, match="calibration inputs"):
        calibrated_quantizer(STATIC["minmax"], None)


def test_kv_quantization_error_by_format_and_granularity():
    torch.manual_seed(3)
    keys = torch.randn(2, 4, 16, 8)
    keys[:, 0] *= 30  # one head much larger than the others: a per-token scale serves it first
    error = {(fmt, gran): _relative_error(fake_quantize_kv(keys, KVSpec(fmt, gran)), keys)
             for fmt in ("int8", "int4", "fp8-e4m3") for gran in ("per-token", "per-head")}
    quiet = keys[:, 1:]
    quiet_error = {gran: _relative_error(fake_quantize_kv(keys, KVSpec("int4", gran))[:, 1:], quiet)
                   for gran in ("per-token", "per-head")}
    assert quiet_error["per-head"] < quiet_error["per-token"] / 10
    assert error["int8", "per-token"] < error["fp8-e4m3", "per-token"] < error["int4", "per-token"]
    assert fake_quantize_kv(keys, KVSpec()).shape == keys.shape


@pytest.fixture(scope="module")
def lm_eval_config():
    return EvalConfig(ctx=256, max_tokens=8192)


def _ppl(model, tokenizer, config) -> float:
    from quantlab.evaluation import load_text

    return perplexity(model, tokenizer, load_text("heldout"), config).perplexity


def test_kv_cache_int8_is_close_to_fp_and_int4_is_worse(bundled_lm, lm_eval_config):
    model, tokenizer = bundled_lm.model, bundled_lm.tokenizer
    fp = _ppl(model, tokenizer, lm_eval_config)
    int8 = _ppl(kv_quantized_view(model, KVSpec("int8")), tokenizer, lm_eval_config)
    int4 = _ppl(kv_quantized_view(model, KVSpec("int4")), tokenizer, lm_eval_config)
    assert abs(int8 - fp) / fp < 0.005
    assert int4 > int8 and int4 > fp
    assert math.isfinite(int4)
    # the shared model is untouched: still its own attention, same perplexity
    assert model.model.layers[0].self_attn.config._attn_implementation != "quantlab_kv"
    assert _ppl(model, tokenizer, lm_eval_config) == fp


def test_kv_view_shares_weights_and_apply_remove_round_trip(tiny_llama, tiny_bert):
    view = kv_quantized_view(tiny_llama, KVSpec("int8"))
    assert view.model.embed_tokens.weight is tiny_llama.model.embed_tokens.weight
    assert view.model.layers[0].self_attn is not tiny_llama.model.layers[0].self_attn
    ids = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference, quantized = tiny_llama(ids).logits, view(ids).logits
    assert not torch.equal(reference, quantized)
    assert _relative_error(quantized, reference) < 1e-3
    mask = torch.ones(2, 24, dtype=torch.long)
    with torch.no_grad():
        fp = tiny_bert(input_ids=ids % 1024, attention_mask=mask).last_hidden_state
        assert apply_kv_quantization(tiny_bert, KVSpec("int8", "per-head")) == 2
        q = tiny_bert(input_ids=ids % 1024, attention_mask=mask).last_hidden_state
        remove_kv_quantization(tiny_bert)
        back = tiny_bert(input_ids=ids % 1024, attention_mask=mask).last_hidden_state
    assert not torch.equal(fp, q) and _relative_error(q, fp) < 1e-3
    assert torch.equal(fp, back)
