"""A model too large for the memory left is refused in one line before it is read, not OOM-killed."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from quantlab.cli import main as cli_main
from quantlab.errors import ModelLoadError, QuantizationError
from quantlab.models import memory
from quantlab.models.loading import BUNDLED_LM, load_model, resolve_source
from quantlab.models.stored_formats import route_for
from quantlab.recipe import parse_config_name
from quantlab.runs.export import export_compressed
from quantlab.runs.pipeline import quantize_model


@pytest.fixture
def one_mib_free(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**20)


def test_a_model_larger_than_the_free_memory_is_refused_with_the_way_out(one_mib_free):
    with pytest.raises(ModelLoadError, match=r"needs about .* GiB in float32 but cpu has 0.0 GiB free.*--sequential"):
        load_model(BUNDLED_LM, device="cpu")


def test_the_cli_says_it_in_one_line(one_mib_free, capsys):
    assert cli_main(["eval", BUNDLED_LM, "--max-tokens", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "GiB free" in err[0] and "--sequential" in err[0], err


def test_the_operator_can_turn_the_check_off(one_mib_free, monkeypatch):
    monkeypatch.setenv(memory.SKIP_ENV, "1")
    assert load_model(BUNDLED_LM, device="cpu").model is not None


def test_the_estimate_is_what_the_model_holds():
    loaded = load_model(BUNDLED_LM, device="cpu")
    held = {id(t): t for t in (*loaded.model.parameters(), *loaded.model.buffers())}.values()
    expected = sum(t.numel() * t.element_size() for t in held)
    estimate = memory.parameter_bytes(loaded.model.config, torch.float32)
    assert estimate == pytest.approx(expected, rel=0.01)
    assert memory.parameter_bytes(loaded.model.config, torch.bfloat16) == pytest.approx(expected / 2, rel=0.01)


def test_a_prequantized_export_is_counted_at_its_dequantized_size(tmp_path):
    loaded = load_model(BUNDLED_LM, device="cpu")
    model, _ = quantize_model(loaded, parse_config_name("int4-g64"), evaluate_quality=False)
    export = export_compressed(model, tmp_path / "q", loaded.tokenizer).path
    config = AutoConfig.from_pretrained(export)
    route_for(config)  # as load_model does: the plain architecture
    on_disk = sum(p.stat().st_size for p in export.glob("*.safetensors"))
    estimate = memory.parameter_bytes(config, torch.float32)
    full = memory.parameter_bytes(AutoConfig.from_pretrained(resolve_source(BUNDLED_LM)), torch.float32)
    assert estimate == full and estimate > on_disk  # what it loads as, not the packed codes


def test_this_machine_reports_its_free_memory():
    free = memory.available_bytes(torch.device("cpu"))
    assert free is None or free > 0
    assert memory.available_bytes(torch.device("meta")) is None


def test_page_cache_counts_as_free_in_a_container(tmp_path):
    stat = tmp_path / "memory.stat"
    stat.write_text("anon 100\nfile 5000\ninactive_file 4096\nactive_file 904\n")
    assert memory._reclaimable(str(stat)) == 4096
    assert memory._reclaimable(str(tmp_path / "missing")) == 0


def test_quantizing_in_memory_what_cannot_hold_its_codes_is_refused(bundled_lm, one_mib_free, capsys, monkeypatch):
    with pytest.raises(QuantizationError, match=r"needs at least .* GiB more .*--sequential"):
        quantize_model(bundled_lm, parse_config_name("int4-g64"), evaluate_quality=False)
    monkeypatch.setattr(memory, "check_fits", lambda *args, **kwargs: None)  # the model loads; its run cannot
    assert cli_main(["quantize", BUNDLED_LM, "--method", "rtn", "--max-eval-tokens", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "GiB more" in err[0], err


def test_the_run_estimate_is_the_codes_and_one_fp32_block(bundled_lm, monkeypatch):
    linears = bundled_lm.structure.linears
    weights = sum(info.in_features * info.out_features for info in linears)
    largest = max(sum(i.in_features * i.out_features for i in linears if i.block == b) for b in {i.block for i in linears})
    needed = weights + 4 * largest
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(needed * memory.MARGIN) + 1)
    memory.check_run_fits("m", linears, torch.device("cpu"))  # just enough
    monkeypatch.setattr(memory, "available_bytes", lambda device: needed)
    with pytest.raises(QuantizationError):
        memory.check_run_fits("m", linears, torch.device("cpu"))
