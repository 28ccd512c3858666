"""Calibration sets, activation statistics and the block-sequential runner on tiny real models."""

from __future__ import annotations

import copy

import pytest
import torch

from quantlab.algorithms import rtn
from quantlab.recipe import CalibConfig, parse_config_name
from quantlab.models.architectures import find_linears
from quantlab.calibrate.runner import (
    BlockContext, calibration_set, capture_block_inputs, collect_activation_stats, run_blocks,
)
from quantlab.errors import DataError
from quantlab.calibrate.inputstats import InputRecorder
from quantlab.models.quantized import QuantizedLinear, build_quantized_model

from conftest import VOCAB


def random_ids(n: int = 6, length: int = 32, vocab: int = VOCAB, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def state_checksum(model: torch.nn.Module) -> dict[str, float]:
    return {name: tensor.double().sum().item() for name, tensor in model.state_dict().items()}


def final_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states[-1]


class WordTokenizer:
    """Whitespace words to ids: a real tokenizer's call signature on a text we control."""

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [hash(word) % 1000 for word in text.split()]}


def test_calibration_set_is_seeded_windows_of_the_text(tmp_path):
    text_file = tmp_path / "calib.txt"
    text_file.write_text(" ".join(f"w{i}" for i in range(5000)))
    cfg = CalibConfig(n_samples=5, seq_len=40, seed=3, source=str(text_file))
    ids = calibration_set(WordTokenizer(), cfg)
    assert ids.shape == (5, 40) and ids.dtype == torch.long
    assert torch.equal(ids, calibration_set(WordTokenizer(), cfg))  # same seed, same windows
    assert not torch.equal(ids, calibration_set(WordTokenizer(), CalibConfig(5, 40, seed=4, source=str(text_file))))
    stream = torch.tensor(WordTokenizer()(text_file.read_text())["input_ids"])
    for window in ids:  # every window is a contiguous run of the tokenized text
        starts = (stream == window[0]).nonzero().flatten()
        assert any(torch.equal(stream[s : s + 40], window) for s in starts.tolist())


def test_calibration_text_too_short_or_missing_is_a_data_error(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("word " * 100)
    with pytest.raises(DataError, match="fewer than one window"):
        calibration_set(WordTokenizer(), CalibConfig(n_samples=2, seq_len=500, source=str(short)))
    with pytest.raises(DataError):
        calibration_set(WordTokenizer(), CalibConfig(source=str(tmp_path / "missing.txt")))


def test_calibration_set_from_the_bundled_training_text(bundled_lm):
    ids = calibration_set(bundled_lm.tokenizer, CalibConfig(n_samples=4, seq_len=64))
    assert ids.shape == (4, 64) and 0 <= int(ids.min()) and int(ids.max()) < VOCAB
    assert len(set(map(tuple, ids.tolist()))) == 4


def test_recorder_matches_statistics_computed_by_hand(tiny_llama):
    block = tiny_llama.model.layers[0]
    inputs = capture_block_inputs(tiny_llama, random_ids(), batch_size=4)
    seen = []
    handle = block.mlp.down_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, 128)))
    linears = {"mlp.down_proj": block.mlp.down_proj, "self_attn.q_proj": block.self_attn.q_proj,
               "self_attn.k_proj": block.self_attn.k_proj}
    recorder = InputRecorder(linears, inputs.n_tokens, keep_inputs=True, percentiles=True)
    with torch.no_grad():
        for x, args, kwargs in zip(inputs.hidden, inputs.args, inputs.kwargs):
            block(x, *args, **kwargs)
            recorder.next_batch()
    handle.remove()
    result = recorder.finish()
    X = torch.cat(seen)  # (tokens, 128)
    down = result["mlp.down_proj"]
    assert down.n_tokens == X.shape[0] == 6 * 32
    torch.testing.assert_close(down.hessian, 2 * X.T @ X / X.shape[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(down.stats.absmax, X.abs().amax(0))
    torch.testing.assert_close(down.stats.mean_abs, X.abs().mean(0), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(down.stats.p99, X.abs().kthvalue(191, dim=0).values)  # ceil(0.99 * 192)
    assert result["self_attn.k_proj"] is result["self_attn.q_proj"]  # one input, one accumulator
    assert len(down.inputs) == 2 and torch.equal(torch.cat([x.reshape(-1, 128) for x in down.inputs]), X)


def test_collect_activation_stats_covers_every_linear_and_leaves_the_model_alone(tiny_llama):
    before = state_checksum(tiny_llama)
    stats = collect_activation_stats(tiny_llama, random_ids())
    assert set(stats) == {info.name for info in find_linears(tiny_llama)}
    for info in find_linears(tiny_llama):
        s = stats[info.name]
        assert s.absmax.shape == (info.in_features,) and s.n_tokens == 6 * 32
        assert torch.all(s.mean_abs <= s.p99) and torch.all(s.p99 <= s.p999) and torch.all(s.p999 <= s.absmax)
    assert state_checksum(tiny_llama) == before
    assert not any(module._forward_pre_hooks for module in tiny_llama.modules())


@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt", "bert"])
def test_runner_without_changes_reproduces_the_model(kind, request):
    model = request.getfixturevalue(f"tiny_{kind}")
    ids = random_ids(vocab=1000)
    run = run_blocks(model, ids, lambda ctx: [], config=None, batch_size=4)
    assert run.model is not model and run.layers == []
    torch.testing.assert_close(final_hidden(run.model, ids), final_hidden(model, ids))


@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt", "bert"])
def test_runner_quantizes_every_linear_into_a_new_model(kind, request):
    model = request.getfixturevalue(f"tiny_{kind}")
    before = state_checksum(model)
    config = parse_config_name("int8", calib=CalibConfig(n_samples=6, seq_len=32))
    ids = random_ids(vocab=1000)
    progress = []
    run = run_blocks(model, ids, rtn.process_block, config, batch_size=4, progress=lambda f, m: progress.append(f))
    assert state_checksum(model) == before  # the original is never modified
    quantized = [m for m in run.model.modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == len(run.layers) == len(find_linears(model))
    assert all(layer.output_error < 1e-3 and layer.weight_error < 1e-3 for layer in run.layers)
    assert progress[0] == 0.0 and progress[-1] == 1.0
    fp, q = final_hidden(model, ids), final_hidden(run.model, ids)
    assert (fp - q).pow(2).sum() / fp.pow(2).sum() < 1e-3


def test_quantized_model_shares_everything_outside_the_blocks(tiny_llama):
    blocks = [copy.deepcopy(b) for b in tiny_llama.model.layers]
    new = build_quantized_model(tiny_llama, blocks)
    assert new.model.embed_tokens is tiny_llama.model.embed_tokens and new.lm_head is tiny_llama.lm_head
    assert new.model.norm is tiny_llama.model.norm
    assert new.model is not tiny_llama.model and new.model.layers is not tiny_llama.model.layers
    assert all(a is b for a, b in zip(new.model.layers, blocks))
    assert tiny_llama.model.layers[0] is not blocks[0]


def test_block_context_collects_on_demand(tiny_llama):
    def process(ctx: BlockContext):
        plain, with_inputs = ctx.collect(), ctx.collect(keep_inputs=True)
        assert plain["mlp.up_proj"].inputs is None and len(with_inputs["mlp.up_proj"].inputs) == 2
        assert plain["mlp.up_proj"].stats.p99 is None  # percentiles only when asked for
        torch.testing.assert_close(plain["mlp.up_proj"].hessian, with_inputs["mlp.up_proj"].hessian)
        assert set(ctx.linears) == set(ctx.linear_modules()) and ctx.prefix == f"model.layers.{ctx.index}"
        return []

    run_blocks(tiny_llama, random_ids(), process, config=None, batch_size=3, convert=False)
