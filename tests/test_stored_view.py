"""A pre-quantized checkpoint's layers as stored: the codes and scales the files hold, on the Weights page.

The folders are real: QuantLab's own compressed-tensors export of the bundled LM (signed codes) and a
GPTQ-format checkpoint packed with AutoGPTQ's loop (unsigned codes around zero-points).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from streamlit.testing.v1 import AppTest

from quantlab.analysis.stored import stored_size, stored_view
from quantlab.errors import ModelLoadError
from quantlab.models.loading import load_model
from quantlab.models.prequantized import stored_layer
from quantlab.models.quantized import QuantizedLinear
from quantlab.recipe import CalibConfig, parse_config_name
from quantlab.runs.export import export_compressed
from quantlab.runs.pipeline import quantize_model

from tests.test_prequantized import _gptq_tensors

APP = str(Path(__file__).resolve().parent.parent / "app.py")
LAYER = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def exported(bundled_lm, tmp_path_factory) -> tuple[Path, QuantizedLinear]:
    config = parse_config_name("int4-g64", calib=CalibConfig(n_samples=2, seq_len=32))
    model, _ = quantize_model(bundled_lm, config, evaluate_quality=False)
    folder = tmp_path_factory.mktemp("stored") / "export"
    export_compressed(model, folder, bundled_lm.tokenizer)
    return folder, model.get_submodule(LAYER)


def test_the_stored_codes_are_the_quantized_layers_codes(exported):
    folder, module = exported
    reopened = load_model(folder, device="cpu")
    layer = stored_layer(folder, reopened.stored.qconfig, LAYER)
    assert layer.scheme == "int4-g64" and layer.zero is None
    assert layer.codes.min() >= -8 and layer.codes.max() <= 7  # the full signed INT4 range, as stored
    torch.testing.assert_close(layer.weight(), module.dequantized_weight().float(), rtol=0, atol=0)
    view = stored_view(layer, reopened.model.get_submodule(LAYER).weight)
    assert view.codes["count"].sum() == layer.codes.numel()
    assert view.summary["codes_used"] == len(view.codes) <= 16
    assert view.summary["max_abs_difference"] == 0.0
    assert view.summary["scales_stored"] == layer.codes.shape[0] * layer.codes.shape[1] // 64
    with pytest.raises(ModelLoadError, match="not stored quantized"):
        stored_layer(folder, reopened.stored.qconfig, "lm_head")


def test_a_gptq_checkpoint_shows_unsigned_codes_around_its_zero_points(tiny_model_dirs, tmp_path):
    source = tiny_model_dirs["llama"]
    state = load_file(source / "model.safetensors")
    key = next(k for k in state if k.endswith("mlp.down_proj.weight"))
    stem = key.removesuffix(".weight")
    tensors, expected = _gptq_tensors(state.pop(key), 32)
    state.update({f"{stem}.{name}": t for name, t in tensors.items()})
    folder = tmp_path / "gptq"
    folder.mkdir()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False,
                                     "desc_act": False, "checkpoint_format": "gptq"}
    (folder / "config.json").write_text(json.dumps(config))
    reopened = load_model(folder, device="cpu")
    layer = stored_layer(folder, reopened.stored.qconfig, stem)
    assert layer.scheme == "int4-g32-asym" and layer.codes.min() >= 0 and layer.codes.max() <= 15
    torch.testing.assert_close(layer.weight(), expected, rtol=0, atol=0)
    assert stored_view(layer).summary["code_min"] >= 0


def _open_in_app(folder: Path, page: str, monkeypatch) -> AppTest:
    """The app with ``folder`` chosen in the local-path box (inside the operator's roots), on ``page``."""
    from pages.common import FOLDER_LABEL

    monkeypatch.setenv("QUANTLAB_LOCAL_ROOTS", str(folder.parent))
    at = AppTest.from_file(APP, default_timeout=300).run()
    at.selectbox(key="sb_model").set_value(FOLDER_LABEL).run()
    at.text_input(key="sb_folder").set_value(str(folder)).run()
    at.switch_page(page).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    return at


def test_the_weights_page_shows_a_prequantized_layer_as_stored(exported, monkeypatch):
    at = _open_in_app(exported[0], "pages/weights_page.py", monkeypatch)
    at.selectbox(key="w_layer").set_value(LAYER).run()
    assert any(h.value == "As stored in the checkpoint" for h in at.subheader)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Stored scheme"] == "int4-g64"
    used, low, high = re.fullmatch(r"(\d+) \((-?\d+) … (-?\d+)\)", metrics["Codes used"]).groups()
    assert int(used) <= 16 and -8 <= int(low) < int(high) <= 7
    assert any("not re-quantized" in c.value for c in at.caption)


def test_the_size_page_counts_a_prequantized_checkpoints_stored_bits(exported, bundled_lm, monkeypatch):
    folder, _ = exported
    reopened = load_model(folder, device="cpu")
    size = stored_size(reopened)
    assert size.layers == len(bundled_lm.structure.linears)
    # INT4 g64 with fp16 scales: 4 + 16/64 bits, plus each layer's few bytes of stored shape
    assert 4.25 <= size.bits_per_weight < 4.26
    at = _open_in_app(folder, "pages/size_page.py", monkeypatch)
    assert any("As stored" in m.value and f"{size.bits_per_weight:.3f} bits per weight" in m.value
               for m in at.markdown)
