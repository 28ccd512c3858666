"""Model loading, tensor listing, safe weights files and size accounting (quantlab.models.loading)."""

from __future__ import annotations

import json
import math
import pathlib
import shutil
import time

import pytest
import torch
from conftest import HIDDEN, build_tiny
from huggingface_hub import constants
from safetensors.torch import save_file
from transformers import GPT2Config

from quantlab.models.architectures import conv1d_stored, find_linears, weight_matrix
from quantlab.errors import FormatError, ModelLoadError
from quantlab.numerics.formats import QuantFormat
from quantlab.models.loading import (
    BUNDLED_ENCODER, BUNDLED_LM, copy_model, inspect_tensors, is_bundled, load_model, load_tensors, matrix_tensors,
    model_size, model_skeleton, reference_size, resolve_source, skipped_tensors,
)
from quantlab.numerics.packing import pack_quantized
from quantlab.numerics.primitives import quantize
from quantlab.models.sizing import REFERENCE_MODELS

INT4_G32 = QuantFormat.parse("int4-g32")


def test_resolve_source_maps_bundled_names_and_leaves_others():
    lm_folder = pathlib.Path(resolve_source(None))
    assert lm_folder == pathlib.Path(resolve_source(BUNDLED_LM))
    assert (lm_folder / "config.json").is_file()
    assert (pathlib.Path(resolve_source(BUNDLED_ENCODER)) / "config.json").is_file()
    assert resolve_source("gpt2") == "gpt2"
    assert is_bundled(None) and is_bundled(BUNDLED_ENCODER) and is_bundled(lm_folder)
    assert is_bundled(lm_folder.parent / ".." / "models" / BUNDLED_LM)
    assert not is_bundled("gpt2") and not is_bundled(lm_folder.parent)


def test_bundled_lm_loads_offline_and_predicts(bundled_lm, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lm = bundled_lm
    assert lm.kind == "causal" and lm.tokenizer is not None
    assert not lm.model.training and not any(p.requires_grad for p in lm.model.parameters())
    ids = lm.tokenizer("import os\nimport sys\n", return_tensors="pt").input_ids
    logits = lm.model(ids).logits  # (1, T, vocab)
    assert logits.shape == (1, ids.shape[1], lm.model.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert {info.role for info in find_linears(lm.model)} == {"q", "k", "v", "o", "gate", "up", "down"}


def test_bundled_encoder_loads_by_name(bundled_encoder):
    enc = bundled_encoder
    assert enc.kind == "encoder" and enc.name == BUNDLED_ENCODER
    batch = enc.tokenizer(["a sentence to embed"], return_tensors="pt")
    hidden = enc.model(**batch).last_hidden_state  # (1, T, 384)
    assert hidden.shape[-1] == 384 and torch.isfinite(hidden).all()
    assert len(find_linears(enc.model)) == 6 * 6


@pytest.mark.parametrize("kind, roles, blocks", [
    ("llama", {"q", "k", "v", "o", "gate", "up", "down"}, "model.layers."),
    ("gpt2", {"qkv", "o", "up", "down"}, "transformer.h."),
    ("opt", {"q", "k", "v", "o", "up", "down"}, "model.decoder.layers."),
    ("bert", {"q", "k", "v", "o", "up", "down"}, "encoder.layer."),
])
def test_saved_tiny_models_load_with_their_linear_roles(tiny_model_dirs, kind, roles, blocks):
    loaded = load_model(tiny_model_dirs[kind], device="cpu")
    assert loaded.kind == ("encoder" if kind == "bert" else "causal")
    assert (loaded.tokenizer is None) == (kind == "bert")  # the bert folder has no tokenizer files
    linears = find_linears(loaded.model)
    assert {info.role for info in linears} == roles
    assert all(info.name.startswith(blocks) for info in linears)
    assert {info.block for info in linears} == {0, 1}
    reference = build_tiny(kind).state_dict()  # same seed: the saved weights come back exactly
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def test_gpt2_conv1d_is_read_as_out_by_in(tiny_gpt2):
    infos = {info.local_name: info for info in find_linears(tiny_gpt2)}
    c_attn = infos["attn.c_attn"]
    assert c_attn.is_conv1d and (c_attn.out_features, c_attn.in_features) == (3 * HIDDEN, HIDDEN)
    module = tiny_gpt2.get_submodule(c_attn.name)
    x = torch.randn(5, HIDDEN)
    assert torch.allclose(module(x), x @ weight_matrix(module).T + module.bias, atol=1e-6)
    sizes = {layer.name: layer for layer in model_size(tiny_gpt2, INT4_G32).layers}
    assert sizes[c_attn.name].shape == (3 * HIDDEN, HIDDEN)


def test_a_bare_gpt2_file_is_read_as_out_by_in_like_the_loaded_model(tiny_gpt2, tmp_path):
    """A GPT-2 safetensors file without its config stores Conv1D weights (in, out): the weight views
    and the size accounting turn them round, so input channels and per-channel scales match the model's."""
    from quantlab.analysis.tensors import file_matrices, model_matrices

    state = {n: t.contiguous() for n, t in tiny_gpt2.state_dict().items() if n != "lm_head.weight"}  # tied
    path = tmp_path / "gpt2.safetensors"
    save_file(state, path)
    from_file = {m.name.removesuffix(".weight"): m.weight for m in file_matrices(load_tensors(path))}
    from_model = {m.name: m.weight for m in model_matrices(tiny_gpt2)}
    assert from_file.keys() == from_model.keys()
    assert all(torch.equal(from_file[name], from_model[name]) for name in from_model)  # (out, in) both
    per_channel = QuantFormat.parse("int4-per-channel")
    file_sizes = {layer.name.removesuffix(".weight"): layer
                  for layer in model_size(inspect_tensors(path), per_channel).layers if layer.quantized}
    model_sizes = {layer.name: layer for layer in model_size(tiny_gpt2, per_channel).layers if layer.quantized}
    assert {n: (l.shape, l.scale_bytes) for n, l in file_sizes.items()} == \
        {n: (l.shape, l.scale_bytes) for n, l in model_sizes.items()}
    c_attn = file_sizes["transformer.h.0.attn.c_attn"]
    assert c_attn.shape == (3 * HIDDEN, HIDDEN) and c_attn.scale_bytes == 3 * HIDDEN * 2  # one fp16 scale per output


def test_linear_layouts_that_reuse_gpt2_names_stay_as_stored():
    """GPTBigCode names its nn.Linear layers like GPT-2: stored (out, in), nothing is turned round."""
    shapes = {"h.0.attn.c_attn.weight": (3 * HIDDEN, HIDDEN), "h.0.attn.c_proj.weight": (HIDDEN, HIDDEN),
              "h.0.mlp.c_fc.weight": (4 * HIDDEN, HIDDEN), "h.0.mlp.c_proj.weight": (HIDDEN, 4 * HIDDEN)}
    assert conv1d_stored(shapes) == frozenset()
    transposed = {name: shape[::-1] for name, shape in shapes.items()}
    assert conv1d_stored(transposed) == frozenset(shapes)
    assert conv1d_stored({"model.layers.0.mlp.down_proj.weight": (HIDDEN, 4 * HIDDEN)}) == frozenset()


def test_copy_model_leaves_the_original_untouched(tiny_model_dirs):
    original = load_model(tiny_model_dirs["llama"], device="cpu")
    before = original.model.model.layers[0].self_attn.q_proj.weight.clone()
    copied = copy_model(original)
    copied.model.model.layers[0].self_attn.q_proj.weight.mul_(0)
    assert torch.equal(original.model.model.layers[0].self_attn.q_proj.weight, before)
    assert copied.model.lm_head.weight is copied.model.model.embed_tokens.weight  # tying survives the copy
    assert copied.tokenizer is original.tokenizer and copied.name == original.name


def test_bare_safetensors_file_lists_and_loads(tmp_path):
    tensors = {"w": torch.randn(8, 32), "half": torch.randn(4, 16).half(), "norm": torch.ones(32),
               "codes": torch.zeros(8, 8, dtype=torch.int8)}
    path = tmp_path / "bare.safetensors"
    save_file(tensors, path)
    listing = inspect_tensors(path)
    by_name = {t.name: t for t in listing.tensors}
    assert by_name["half"].shape == (4, 16) and by_name["half"].dtype == "float16" and by_name["half"].bytes == 128
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert listing.total_bytes == path.stat().st_size - 8 - header_len
    assert listing.total_params == sum(t.numel() for t in tensors.values())
    loaded = load_tensors(path)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert sorted(name for name, _ in matrix_tensors(loaded)) == ["half", "w"]
    assert dict(skipped_tensors(loaded)).keys() == {"codes", "norm"}


def test_sharded_checkpoint_lists_as_a_whole(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path / "one")
    tiny_llama.save_pretrained(tmp_path / "sharded", max_shard_size="400KB")
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    shards = sorted((tmp_path / "sharded").glob("*.safetensors"))
    assert index.is_file() and len(shards) > 1
    whole = inspect_tensors(tmp_path / "one" / "model.safetensors")
    for source in (index, tmp_path / "sharded", shards):
        listing = inspect_tensors(source)
        assert (listing.total_params, listing.total_bytes) == (whole.total_params, whole.total_bytes)
        assert sorted(t.name for t in listing.tensors) == sorted(t.name for t in whole.tensors)
    assert load_tensors(index).keys() == load_tensors(tmp_path / "one").keys()
    assert load_model(tmp_path / "sharded", device="cpu").kind == "causal"


def _safetensors_bytes(header: dict, data: bytes, header_len: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return (len(raw) if header_len is None else header_len).to_bytes(8, "little") + raw + data


def _good() -> dict:
    return {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}


BAD_FILES = {
    "empty": b"",
    "short": b"\x05\x00\x00",
    "header longer than file": _safetensors_bytes(_good(), bytes(16), header_len=10_000),
    "header not JSON": (5).to_bytes(8, "little") + b"{oops" + bytes(16),
    "header not an object": _safetensors_bytes([1, 2], bytes(16)),
    "truncated data": _safetensors_bytes(_good(), bytes(10)),
    "offsets past the end": _safetensors_bytes({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]}},
                                               bytes(16)),
    "size does not match shape": _safetensors_bytes({"a": {"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 16]}},
                                                    bytes(16)),
    "overlapping tensors": _safetensors_bytes({**_good(), "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}},
                                              bytes(16)),
    "unsupported dtype": _safetensors_bytes({"a": {"dtype": "Q4_K", "shape": [2, 2], "data_offsets": [0, 16]}},
                                            bytes(16)),
    "negative shape": _safetensors_bytes({"a": {"dtype": "F32", "shape": [-2, 2], "data_offsets": [0, 16]}},
                                         bytes(16)),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_corrupt_safetensors_are_named_errors(tmp_path, case):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(BAD_FILES[case])
    for read in (inspect_tensors, load_tensors):
        with pytest.raises(ModelLoadError, match="bad.safetensors"):
            read(path)


def test_truncated_model_folder_is_a_load_error(tmp_path, tiny_model_dirs):
    folder = tmp_path / "cut"
    folder.mkdir()
    for item in tiny_model_dirs["llama"].iterdir():
        data = item.read_bytes()
        (folder / item.name).write_bytes(data[: len(data) // 2] if item.suffix == ".safetensors" else data)
    with pytest.raises(ModelLoadError, match="truncated"):
        load_model(folder)


class _RunsCode:
    """Unpickling this calls Path.touch: the test can tell whether the pickle's code ran."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_pickle_that_runs_code_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"w": torch.zeros(2, 2), "evil": _RunsCode(marker)}, tmp_path / "evil.bin")
    with pytest.raises(ModelLoadError, match="refused"):
        load_tensors(tmp_path / "evil.bin")
    assert not marker.exists()


def test_model_folder_with_a_code_pickle_is_refused(tmp_path, tiny_llama):
    marker = tmp_path / "code-ran"
    tiny_llama.config.save_pretrained(tmp_path)
    torch.save({**tiny_llama.state_dict(), "evil": _RunsCode(marker)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="refused"):
        load_model(tmp_path)
    assert not marker.exists()


def test_pickles_hold_plain_tensors_only(tmp_path):
    torch.save({"w": torch.randn(4, 8)}, tmp_path / "ok.pt")
    assert inspect_tensors(tmp_path / "ok.pt").tensors[0].shape == (4, 8)
    torch.save({"w": torch.zeros(2), "epoch": 3}, tmp_path / "checkpoint.bin")
    with pytest.raises(ModelLoadError, match="refused"):
        load_tensors(tmp_path / "checkpoint.bin")
    (tmp_path / "garbage.bin").write_bytes(b"not a pickle at all")
    with pytest.raises(ModelLoadError, match="garbage.bin"):
        load_tensors(tmp_path / "garbage.bin")


def test_hub_ids_fail_fast_and_helpfully_without_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=BUNDLED_LM):
        load_model("quantlab-tests/not-a-cached-model")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    started = time.perf_counter()
    with pytest.raises(ModelLoadError, match="quantlab-tests/does-not-exist"):  # unreachable here, unknown online
        load_model("quantlab-tests/does-not-exist-4f9c2")
    assert time.perf_counter() - started < 30


def test_cached_hub_id_loads_offline(tmp_path, tiny_model_dirs, monkeypatch):
    """A hub id already in the local cache needs no network: the layout is the hub client's own."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--quantlab-tests--tiny-llama"
    shutil.copytree(tiny_model_dirs["llama"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model("quantlab-tests/tiny-llama", device="cpu")
    assert loaded.name == "quantlab-tests/tiny-llama" and loaded.kind == "causal" and loaded.tokenizer is not None
    listing = inspect_tensors("quantlab-tests/tiny-llama")
    assert listing.total_bytes == inspect_tensors(tiny_model_dirs["llama"]).total_bytes
    assert model_size(model_skeleton("quantlab-tests/tiny-llama"), INT4_G32).total_bytes == \
        model_size(loaded, INT4_G32).total_bytes


@pytest.mark.parametrize("source, message", [
    ("not a valid id!", "valid hub id"),
    ("./missing-folder", "no such file or folder"),
    ("weights.safetensors", "no such file or folder"),
])
def test_bad_sources_are_load_errors(source, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(source)


def test_bad_folders_and_options_are_load_errors(tmp_path, tiny_model_dirs):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="bare weights file"):
        load_model(tiny_model_dirs["llama"] / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "quantlab_custom", "auto_map": {}}))
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="fp32, fp16 or bf16"):
        load_model(tiny_model_dirs["llama"], dtype=torch.int8)
    GPT2Config(n_layer=0, n_embd=16, n_head=2, vocab_size=64).save_pretrained(tmp_path / "no-blocks")
    with pytest.raises(ModelLoadError, match="no linear layers"):
        model_skeleton(tmp_path / "no-blocks")


def test_load_in_half_precision(tiny_model_dirs):
    loaded = load_model(tiny_model_dirs["opt"], dtype="bf16", device="cpu")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


def _expected_size(model: torch.nn.Module, fmt: QuantFormat) -> int:
    """Independent accounting: packed linears + every other distinct tensor at its dtype."""
    linears = {f"{info.name}.weight": info for info in find_linears(model)}
    total, seen = 0, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        info = linears.get(name)
        total += fmt.storage(info.out_features, info.in_features).total_bytes if info else tensor.nbytes
    return total


@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt", "bert"])
@pytest.mark.parametrize("name", ["int4-g32", "int3-g64-asym", "int8", "nf4-g64", "fp8-e4m3"])
def test_model_size_matches_independent_accounting(kind, name):
    model, fmt = build_tiny(kind), QuantFormat.parse(name)
    size = model_size(model, fmt)
    assert size.total_bytes == _expected_size(model, fmt)
    assert size.total_bytes == size.quantized_bytes + size.full_precision_bytes
    assert size.quantized_params == sum(info.numel for info in find_linears(model))
    assert size.bits_per_weight == pytest.approx(8 * size.quantized_bytes / size.quantized_params)


def test_full_precision_size_matches_the_saved_checkpoint(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    data_bytes = path.stat().st_size - 8 - int.from_bytes(path.read_bytes()[:8], "little")
    size = model_size(tiny_llama, INT4_G32)
    assert size.original_bytes == data_bytes  # tied lm_head counted once, as saved
    assert model_size(inspect_tensors(path), INT4_G32).total_bytes == size.total_bytes
    assert model_size(model_skeleton(tmp_path), INT4_G32).total_bytes == size.total_bytes


def _saved_quantized_checkpoint(model: torch.nn.Module, fmt: QuantFormat, path: pathlib.Path) -> int:
    """Quantize and pack every block linear for real, save it with the kept tensors; the data bytes."""
    tensors = load_tensors(model)  # every tensor once (lm_head tied to the embedding)
    for info in find_linears(model):
        del tensors[f"{info.name}.weight"]
        qt = quantize(weight_matrix(model.get_submodule(info.name)).detach(), fmt)
        tensors.update(pack_quantized(qt).to_tensors(info.name))
    save_file({name: t.contiguous() for name, t in tensors.items()}, path)
    return path.stat().st_size - 8 - int.from_bytes(path.read_bytes()[:8], "little")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("name", ["int4-g32", "int3-g64-asym", "int2-per-channel-asym", "int5-per-tensor-asym",
                                  "int8", "nf4-g32", "fp8-e4m3"])
def test_size_accounting_equals_the_bytes_of_a_saved_quantized_model(tmp_path, kind, name):
    model, fmt = build_tiny(kind), QuantFormat.parse(name)
    saved = _saved_quantized_checkpoint(model, fmt, tmp_path / "q.safetensors")
    assert saved == model_size(model, fmt).total_bytes


def test_effective_bits_per_weight_of_int4_g128_asym(tmp_path):
    fmt = QuantFormat.parse("int4-g128-asym")
    with pytest.raises(FormatError, match=r"layers\.0\.self_attn\.q_proj.*\[16, 32, 64\]"):
        model_size(build_tiny("llama"), fmt)  # no layer is 128 wide: the error lists what fits every layer
    path = tmp_path / "wide.safetensors"
    save_file({"blocks.0.proj.weight": torch.zeros(256, 512), "embed.weight": torch.zeros(100, 512)}, path)
    size = model_size(inspect_tensors(path), fmt)
    assert size.bits_per_weight == pytest.approx(4 + 16 / 128 + 4 / 128)
    assert size.full_precision_bytes == 100 * 512 * 4
    assert [layer.name for layer in size.layers if layer.quantized] == ["blocks.0.proj.weight"]


@pytest.mark.parametrize("label, n_params, hidden", REFERENCE_MODELS)
def test_reference_sizes_are_close_to_their_parameter_counts(label, n_params, hidden):
    int4, int8 = QuantFormat.parse("int4-g128"), QuantFormat.parse("int8")
    size4, size8 = reference_size(n_params, int4, hidden=hidden), reference_size(n_params, int8, hidden=hidden)
    params = size4.quantized_params + size4.full_precision_params
    assert math.isclose(params, n_params, rel_tol=0.06), label
    assert size4.bits_per_weight == pytest.approx(4.125)
    assert 8 < size8.bits_per_weight <= 8 + 16 / hidden  # one fp16 scale per row; rows are hidden or wider
    assert size4.total_bytes < size8.total_bytes < size8.original_bytes
