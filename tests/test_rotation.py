"""Hadamard rotation fused into the weights: the same function in full precision, flatter channels."""

from __future__ import annotations

import torch

from quantlab.algorithms.rotation import hadamard_rotation, rotate_model


def test_randomized_hadamard_is_orthogonal():
    Q = hadamard_rotation(256, seed=3)
    torch.testing.assert_close(Q @ Q.T, torch.eye(256, dtype=torch.float64), rtol=0, atol=1e-12)


def test_rotation_keeps_the_logits_and_leaves_the_model_alone(bundled_lm):
    model = bundled_lm.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rotated = rotate_model(model, seed=0)
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, actual = model(ids).logits, rotated(ids).logits
    # fp32 rounding: the rotated weights are rounded once to fp32 after an exact float64 product
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    W, W_rot = model.model.layers[0].self_attn.q_proj.weight, rotated.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(W, W_rot)


def test_rot_configurations_parse_and_run_on_a_rotated_copy(bundled_lm):
    from quantlab.recipe import QuantConfig, parse_config_name
    from quantlab.runs.pipeline import quantize_model

    assert parse_config_name("rot-w4a8").name == "rot-rtn-int4-g128-a8"
    config = parse_config_name("rot-gptq-int4-g128")
    assert config.rotate and config.method == "gptq" and QuantConfig.from_dict(config.to_dict()) == config
    small = parse_config_name("rot-int4-g128")
    model, result = quantize_model(bundled_lm, small, evaluate_quality=False)
    assert result.config.name == "rot-rtn-int4-g128" and len(result.layers) == 28
    ids = torch.randint(0, 4096, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp, q = bundled_lm.model(ids).logits, model(ids).logits
    assert 0 < (q - fp).abs().max() < 0.5 * fp.abs().max()  # quantized, and still the same function roughly
    assert bundled_lm.model.model.norm.weight.ne(1).any()  # the shared model was not rotated in place
