"""AWQ: the scale formula, the alpha and clip searches on small linears, and the bundled LM's bar.

That folding AWQ's scales leaves every block's full-precision output unchanged (Llama, GQA Llama,
GPT-2's Conv1D, OPT, BERT) is tested in test_smoothquant.py, which shares the fold code.
"""

from __future__ import annotations

import pytest
import torch

from quantlab.algorithms import awq
from quantlab.numerics.measures import output_error
from quantlab.recipe import AWQParams, CalibConfig, parse_config_name
from quantlab.algorithms.scaling import ScaleGroup
from quantlab.evaluation import EvalConfig
from quantlab.numerics.formats import QuantFormat
from quantlab.numerics.primitives import fake_quantize
from quantlab.runs.pipeline import QuantSession, quantize_model

INT4_G32 = QuantFormat.parse("int4-g32")


def _salient_inputs(n_tokens: int = 512, in_features: int = 64, seed: int = 0) -> torch.Tensor:
    """Inputs where 3 channels are 20x larger than the rest, as in the activations AWQ targets."""
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(n_tokens, in_features, generator=generator)
    X[:, :3] *= 20
    return X


def _weights(out_features: int, in_features: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))


def test_awq_scales_are_normalised_and_alpha_zero_is_rtn():
    mean_abs = torch.tensor([0.5, 2.0, 8.0])
    s = awq.awq_scales(mean_abs, 0.5)
    assert torch.allclose(s.max() * s.min(), torch.tensor(1.0))
    assert torch.allclose(s / s[0], (mean_abs / mean_abs[0]).sqrt())  # proportional to mean|x|^alpha
    assert torch.equal(awq.awq_scales(mean_abs, 0.0), torch.ones(3))


def test_scale_search_returns_alpha_losses_and_beats_rtn():
    X = _salient_inputs()
    H = X.t() @ X
    weights = {"a": _weights(48), "b": _weights(32, seed=2)}
    group = ScaleGroup("norm", ("a", "b"), folded=True)
    search = awq.search_scales(group, X.abs().mean(0), H, weights, INT4_G32, n_grid=10)
    assert search.alphas == tuple(i / 10 for i in range(10))
    assert set(search.losses) == {"a", "b"} and all(len(v) == 10 for v in search.losses.values())
    rtn = sum(output_error(W, fake_quantize(W, INT4_G32), H) for W in weights.values())
    assert search.total_losses[0] == pytest.approx(rtn, rel=1e-4)  # alpha 0: s = 1, plain RTN
    assert min(search.total_losses) < 0.8 * rtn  # salient channels protected: a real gain
    assert search.best_alpha > 0
    summary = search.summary()
    assert summary["alpha"] == search.best_alpha and summary["loss_best"] == min(search.total_losses)


def test_clip_search_lowers_the_output_error_and_stays_in_range():
    X = _salient_inputs(seed=3)
    W = _weights(40, seed=4)
    W[0, 5] = 12.0  # one outlier weight: its group's range is worth shrinking
    clip = awq.search_clip(W, X.t() @ X, INT4_G32, AWQParams())
    assert clip.ratios.shape == (40, 2, 1)
    assert clip.ratios.min() >= 0.5 - 1e-6 and clip.ratios.max() <= 1.0
    assert clip.ratios.min() < 1.0
    assert clip.loss_after < clip.loss_before


def test_clip_weight_clamps_each_block_to_its_ratio():
    W = torch.tensor([[1.0, -4.0, 2.0, 0.5]])
    fmt = QuantFormat.parse("int4-g2")
    clipped = awq.clip_weight(W, fmt, torch.tensor([[[0.5], [1.0]]]))
    assert torch.equal(clipped, torch.tensor([[1.0, -2.0, 2.0, 0.5]]))


@pytest.fixture(scope="module")
def lm_session(bundled_lm):
    return QuantSession(bundled_lm, None, EvalConfig(ctx=256, max_tokens=8192))


def test_awq_int4_g128_beats_rtn_on_the_bundled_lm(bundled_lm, lm_session):
    calib = CalibConfig(n_samples=16, seq_len=256)
    _, rtn = quantize_model(bundled_lm, parse_config_name("rtn-int4-g128", calib=calib), session=lm_session)
    _, found = quantize_model(bundled_lm, parse_config_name("awq-int4-g128", calib=calib), session=lm_session)
    assert found.quality["perplexity"] < rtn.quality["perplexity"]
    assert found.quality["kl_divergence"] < rtn.quality["kl_divergence"]
    block = found.searches["model.layers.0"]["awq"]
    assert [g["group"] for g in block["scales"]] == [
        "input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"]
    assert all(0 <= g["alpha"] < 1 and g["loss_best"] <= g["loss_rtn"] for g in block["scales"])
    assert "clip_mean" in block["clip"]["mlp.down_proj"] and block["clip"]["self_attn.q_proj"] == {}
    rtn_errors = {layer.name: layer.output_error for layer in rtn.layers}
    better = sum(layer.output_error < rtn_errors[layer.name] for layer in found.layers)
    assert better >= 0.75 * len(found.layers)
