"""Hadamard rotation fused into the weights: the same function in full precision, flatter channels."""

from __future__ import annotations

import logging

import pytest
import torch

from quantlab.algorithms.rotation import hadamard_rotation, rotate_model
from quantlab.errors import FormatError
from quantlab.numerics.hadamard import HadamardTransform, fwht
from quantlab.recipe import CalibConfig

SMALL_CALIB = CalibConfig(n_samples=8, seq_len=64)  # enough tokens to calibrate; the tests check wiring, not quality


def test_randomized_hadamard_is_orthogonal():
    Q = hadamard_rotation(256, seed=3)
    torch.testing.assert_close(Q @ Q.T, torch.eye(256, dtype=torch.float64), rtol=0, atol=1e-12)


def test_fast_walsh_hadamard_is_the_librarys_sylvester_matrix():
    from compressed_tensors.transform import deterministic_hadamard_matrix

    x = torch.randn(5, 3, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fwht(x), x @ deterministic_hadamard_matrix(64, torch.float64), rtol=0, atol=1e-12)


def test_online_hadamard_worked_example():
    transform = HadamardTransform(4)
    transform.signs.copy_(torch.tensor([1.0, -1.0, 1.0, 1.0]))
    assert transform(torch.tensor([1.0, 2.0, 3.0, 4.0])).tolist() == [3.0, 1.0, -4.0, 2.0]  # the docstring's


@pytest.mark.parametrize(("size", "odd", "block"), [(768, 12, 64), (256, 1, 256), (1536, 12, 128)])
def test_online_hadamard_is_orthogonal_and_mixes_every_channel(size, odd, block):
    transform = HadamardTransform(size, seed=1)
    assert (transform.odd.shape[0], transform.block) == (odd, block)
    R = transform.matrix()  # (n, n)
    torch.testing.assert_close(R @ R.T, torch.eye(size, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.allclose(R.abs(), torch.full_like(R, size ** -0.5))  # a Hadamard: every entry ±1/sqrt(n)
    x = torch.randn(7, size, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(transform(x), (x.double() @ R).float(), rtol=1e-5, atol=1e-5)


def test_width_without_a_known_hadamard_falls_back_to_blocks_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="quantlab.numerics.hadamard"):
        transform = HadamardTransform(10)  # no Hadamard matrix of order 10 or 5 exists
    assert "block-diagonal" in caplog.text and transform.block == 2
    R = transform.matrix()
    torch.testing.assert_close(R @ R.T, torch.eye(10, dtype=torch.float64), rtol=0, atol=1e-12)
    assert R[:2, 2:].abs().max() == 0 and R[:2, :2].abs().min() > 0  # blocks of two, each a Hadamard


@pytest.mark.parametrize("down_proj", [False, True])
def test_rotation_keeps_the_logits_and_leaves_the_model_alone(bundled_lm, down_proj):
    model = bundled_lm.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rotated = rotate_model(model, seed=0, down_proj=down_proj)
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, actual = model(ids).logits, rotated(ids).logits
    # fp32 rounding: the rotated weights are rounded once to fp32 after an exact float64 product
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    W, W_rot = model.model.layers[0].self_attn.q_proj.weight, rotated.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(W, W_rot)
    assert (getattr(rotated.model.layers[0].mlp.down_proj, "input_transform", None) is not None) == down_proj


def _down_proj_input(model, ids) -> torch.Tensor:
    """What block 0's down_proj weight multiplies (after its forward pre-hooks), as (tokens, channels)."""
    seen = []
    handle = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return seen[0].reshape(-1, seen[0].shape[-1])


def test_online_rotation_flattens_the_down_proj_inputs(bundled_lm):
    from quantlab.analysis.outliers import excess_kurtosis

    ids = torch.randint(0, 4096, (2, 64), generator=torch.Generator().manual_seed(1))
    before, after = _down_proj_input(bundled_lm.model, ids), _down_proj_input(rotate_model(bundled_lm.model), ids)
    torch.testing.assert_close(after.norm(dim=1), before.norm(dim=1), rtol=1e-4, atol=1e-5)  # a rotation per token
    assert excess_kurtosis(after) < excess_kurtosis(before) / 4  # gate * up's heavy tails spread out
    assert after.abs().amax(0).max() < before.abs().amax(0).max()


def test_rotation_prefixes_parse_and_round_trip():
    from quantlab.recipe import QuantConfig, parse_config_name

    expected = {"rot-w4a8": ("rot-rtn-int4-g128-a8", True, True), "rot1-int4-g128": ("rot1-rtn-int4-g128", True, False),
                "rot4-gptq-int4-g128": ("rot4-gptq-int4-g128", False, True), "int4-g128": ("rtn-int4-g128", False, False)}
    for text, (name, residual, down) in expected.items():
        config = parse_config_name(text)
        assert (config.name, config.rotate, config.rotate_down) == (name, residual, down)
        assert QuantConfig.from_dict(config.to_dict()) == config
    old = {k: v for k, v in parse_config_name("rot1-int4-g128").to_dict().items() if k not in ("rotate_down", "name")}
    assert QuantConfig.from_dict(old).name == "rot1-rtn-int4-g128"  # records from before rot- rotated down_proj
    with pytest.raises(FormatError, match="weight format"):
        QuantConfig(method="fp", rotate_down=True)


def test_post_norm_encoder_gets_the_down_projection_rotation_only(bundled_encoder):
    model = bundled_encoder.model
    with pytest.raises(FormatError, match="rot4-"):
        rotate_model(model)
    rotated = rotate_model(model, residual=False)
    assert isinstance(rotated.encoder.layer[0].output.dense.input_transform, HadamardTransform)
    batch = bundled_encoder.tokenizer(["a quantized encoder", "rotation keeps the function"], return_tensors="pt",
                                      padding=True)
    with torch.no_grad():
        expected, actual = model(**batch).last_hidden_state, rotated(**batch).last_hidden_state
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["rot-int4-g128", "rot-gptq-int4-g128", "rot-w4a8"])
def test_rot_configurations_run_with_the_online_down_proj_rotation(bundled_lm, name):
    from quantlab.models.quantized import QuantizedLinear
    from quantlab.recipe import parse_config_name
    from quantlab.runs.pipeline import quantize_model

    model, result = quantize_model(bundled_lm, parse_config_name(name, calib=SMALL_CALIB), evaluate_quality=False)
    assert result.config.name.startswith("rot-") and len(result.layers) == 28
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, QuantizedLinear) and isinstance(down.input_transform, HadamardTransform)
    assert (down.act_quantizer is not None) == name.endswith("a8")
    ids = torch.randint(0, 4096, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp, q = bundled_lm.model(ids).logits, model(ids).logits
        down.input_transform = None  # without the online rotation the fused W R meets unrotated inputs
        broken = model(ids).logits
    assert 0 < (q - fp).abs().max() < 0.5 * fp.abs().max()  # quantized, and still the same function roughly
    assert (broken - fp).abs().mean() > 2 * (q - fp).abs().mean()
    assert bundled_lm.model.model.norm.weight.ne(1).any()  # the shared model was not rotated in place


def test_awq_after_rotation_keeps_down_proj_scales_unfolded_and_export_refuses(bundled_lm, tmp_path):
    from quantlab.recipe import parse_config_name
    from quantlab.runs.export import export_compressed
    from quantlab.runs.pipeline import quantize_model

    from quantlab.recipe import AWQParams

    config = parse_config_name("rot-awq-int4-g128", calib=SMALL_CALIB, awq=AWQParams(n_grid=4, clip_search=False))
    model, _ = quantize_model(bundled_lm, config, evaluate_quality=False)
    block = model.model.layers[0]
    # up_proj's rows cannot absorb 1/s: the rotation mixes its outputs before down_proj reads them
    assert block.mlp.down_proj.input_scale is not None and block.self_attn.q_proj.input_scale is None
    ids = torch.randint(0, 4096, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp, q = bundled_lm.model(ids).logits, model(ids).logits
    assert (q - fp).abs().max() < 0.5 * fp.abs().max()
    with pytest.raises(FormatError, match="rot1-"):
        export_compressed(model, tmp_path / "out")


def test_outliers_page_shows_down_proj_inputs_flatten_under_the_online_rotation():
    from tests.test_app_pages import open_page

    at = open_page("outliers")
    at.radio(key="o_rot_linear").set_value("down_proj").run()
    at.button(key="o_rotate").click().run()
    assert not at.exception, at.exception
    summary = next(d.value for d in at.dataframe if "excess kurtosis" in d.value).set_index("input")
    assert summary.loc["after rotation", "excess kurtosis"] < summary.loc["before rotation", "excess kurtosis"]
    assert "down_proj input" in at.get("plotly_chart")[-1].proto.spec
