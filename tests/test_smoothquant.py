"""SmoothQuant: the smoothing formula, exact folds on every architecture, and W8A8 on MiniLM.

The fold test also covers AWQ's folds (both methods share :mod:`quantlab.algorithms.scaling`).
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from quantlab.algorithms import awq, smoothquant
from quantlab.recipe import CalibConfig, parse_config_name
from quantlab.algorithms.scaling import ScaleGroup, scale_groups
from quantlab.models.architectures import spec_for
from quantlab.calibrate.runner import run_blocks
from quantlab.evaluation import EvalConfig
from quantlab.runs.pipeline import QuantSession, quantize_model
from conftest import build_tiny

N_CALIB, CALIB_LEN = 4, 32


def test_compute_smoothing_matches_the_formula():
    group = ScaleGroup("norm", ("a", "b"), folded=True)
    act_absmax = torch.tensor([4.0, 1.0, 9.0])
    W_a = torch.tensor([[1.0, -2.0, 0.5], [0.25, 1.0, -1.0]])  # column absmax 1, 2, 1
    W_b = torch.tensor([[-4.0, 0.5, 0.25]])  # column absmax 4, 0.5, 0.25
    smoothing = smoothquant.compute_smoothing(group, act_absmax, [W_a, W_b], alpha=0.5)
    # s_j = sqrt(max|X_j|) / sqrt(max_j over both linears |W|): sqrt(4)/sqrt(4), sqrt(1)/sqrt(2), sqrt(9)/sqrt(1)
    assert torch.allclose(smoothing.scales, torch.tensor([1.0, 2 ** -0.5, 3.0]))
    assert torch.equal(smoothing.weight_absmax, torch.tensor([4.0, 2.0, 1.0]))
    all_to_weights = smoothquant.compute_smoothing(group, act_absmax, [W_a, W_b], alpha=1.0)
    assert torch.allclose(all_to_weights.scales, act_absmax)


def test_dead_channels_give_finite_scales():
    group = ScaleGroup("norm", ("a",), folded=True)
    smoothing = smoothquant.compute_smoothing(group, torch.tensor([0.0, 2.0]), [torch.zeros(3, 2)], alpha=0.5)
    assert torch.isfinite(smoothing.scales).all() and (smoothing.scales > 0).all()


def _gqa_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config).eval()


def _input_scale_hooks(block, groups_and_scales):
    """Pre-hooks dividing the inputs of unfolded groups by s, as QuantizedLinear.input_scale does."""
    handles = []
    for group, scales in groups_and_scales:
        if group.folded:
            continue
        for name in group.linears:
            hook = lambda module, args, s=scales: (args[0] / s, *args[1:])  # noqa: E731
            handles.append(block.get_submodule(name).register_forward_pre_hook(hook))
    return handles


def _fold_and_compare(ctx, method: str) -> tuple[list, float]:
    """Fold ``method``'s scales into the block: [(group, scales)] and the largest relative output change."""
    before = ctx.run_block()
    inputs = ctx.collect()
    if method == "smoothquant":
        found = [(s.group, s.scales) for s in smoothquant.smooth_block(ctx, inputs)]
    else:
        found = [(s.group, s.scales) for s in awq.search_block_scales(ctx, inputs)]
    handles = _input_scale_hooks(ctx.block, found)
    after = ctx.run_block()
    for handle in handles:
        handle.remove()
    change = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(after, before))
    return found, change


@pytest.mark.parametrize("method", ["smoothquant", "awq"])
@pytest.mark.parametrize("kind", ["llama", "gqa-llama", "gpt2", "opt", "bert"])
def test_folded_block_computes_the_same_outputs(kind, method):
    model = _gqa_llama() if kind == "gqa-llama" else build_tiny(kind)
    vocab = model.config.vocab_size
    calib_ids = torch.randint(4, vocab, (N_CALIB, CALIB_LEN), generator=torch.Generator().manual_seed(0))
    config = parse_config_name(f"{method}-int4-g32" + ("-a8" if method == "smoothquant" else ""))
    reports = []

    def fold(ctx) -> list:
        reports.append(_fold_and_compare(ctx, method))
        return []

    run_blocks(model, calib_ids, fold, config, convert=False)
    for found, change in reports:
        assert change < 1e-4, f"{kind}/{method}: folding changed the block output by {change:.2e}"
        groups = [group for group, _ in found]
        scales = torch.cat([s for _, s in found])
        assert not torch.allclose(scales, torch.ones_like(scales)), "the scales must actually move something"
        names = [name for group in groups for name in group.linears]
        assert len(names) == len(set(names)), "a linear belongs to one group at most"
    folded = {group.name for found, _ in reports for group, _ in found if group.folded}
    norms = {"llama": {"input_layernorm", "post_attention_layernorm"}, "gpt2": {"ln_1", "ln_2"},
             "opt": {"self_attn_layer_norm", "final_layer_norm"}, "bert": set()}
    norms["gqa-llama"] = norms["llama"]
    # AWQ also folds into the linears before o and down; GQA's v (2 heads) cannot feed o (4 heads).
    linears = {"llama": {"self_attn.v_proj", "mlp.up_proj"}, "gqa-llama": {"mlp.up_proj"},
               "opt": {"self_attn.v_proj"}, "gpt2": set(), "bert": set()}
    assert folded == norms[kind] | (linears[kind] if method == "awq" else set())


def test_bert_qkv_share_one_input_scale(tiny_bert):
    block = tiny_bert.encoder.layer[0]
    names = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense"]
    shared = {"attention.self.key": "attention.self.query", "attention.self.value": "attention.self.query"}
    groups = scale_groups(block, spec_for(tiny_bert), names, shared)
    assert groups[0] == ScaleGroup("attention.self.query", tuple(names[:3]), folded=False)
    assert [g.linears for g in groups[1:]] == [(name,) for name in names[3:]]


@pytest.fixture(scope="module")
def encoder_session(bundled_encoder):
    return QuantSession(bundled_encoder, None, EvalConfig(n_sentences=32, max_sentence_tokens=64))


def test_smoothquant_keeps_minilm_w8a8_fidelity_higher(bundled_encoder, encoder_session):
    """Static per-tensor INT8 activations: one scale per tensor, set by MiniLM's outlier channels.

    That is where smoothing pays off (with dynamic per-token scales plain W8A8 is already close to
    full precision and smoothing has little left to win).
    """
    calib = CalibConfig(n_samples=8, seq_len=64)
    plain = parse_config_name("rtn-int8-a8-static", calib=calib)
    smoothed = parse_config_name("smoothquant-int8-a8-static", calib=calib)
    _, plain_result = quantize_model(bundled_encoder, plain, session=encoder_session)
    _, smooth_result = quantize_model(bundled_encoder, smoothed, session=encoder_session)
    assert smooth_result.quality["fidelity"] > plain_result.quality["fidelity"]
    searches = smooth_result.searches["encoder.layer.0"]["smoothquant"]
    qkv = next(g for g in searches if g["group"] == "attention.self.query")
    assert qkv["act_outlier_ratio_after"] < qkv["act_outlier_ratio_before"]
    smoothed_roles = {layer.role for layer in smooth_result.layers if layer.extra["smoothed"]}
    assert smoothed_roles == {"q", "k", "v", "up"}  # the norm-fed linears; o and down as they are
