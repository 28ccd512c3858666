"""The app's local-path box and memory-mapped weights: a folder, a .safetensors file, a shard index.

A sharded checkpoint (the tiny Llama saved in small shards) opens for the weight pages without
loading it: its tensors are views of memory maps, read only when a page uses them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from quantlab.errors import ModelLoadError
from quantlab.models.loading import load_tensors, local_path, map_tensors

from conftest import build_tiny

APP = str(Path(__file__).resolve().parent.parent / "app.py")
TIMEOUT = 300


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sharded") / "llama"
    build_tiny("llama").to(torch.bfloat16).save_pretrained(folder, max_shard_size="200KB")
    assert len(list(folder.glob("*.safetensors"))) > 1
    return folder


def test_mapped_tensors_equal_loaded_ones_and_are_not_copies(sharded):
    index = sharded / "model.safetensors.index.json"
    mapped, loaded = map_tensors(index), load_tensors(str(sharded))
    assert mapped.keys() == loaded.keys()
    assert all(torch.equal(mapped[k], loaded[k]) and mapped[k].dtype == torch.bfloat16 for k in loaded)
    one = next(iter(sorted(sharded.glob("*.safetensors"))))
    assert map_tensors(one).keys() <= mapped.keys()


def test_local_path_refuses_what_does_not_exist(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        local_path(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("which", ["index", "shard", "model folder"])
def test_the_path_box_opens_a_folder_a_file_or_an_index(sharded, which, monkeypatch):
    from pages.common import FOLDER_LABEL

    monkeypatch.setenv("QUANTLAB_LOCAL_ROOTS", str(sharded.parent))  # the operator's roots (README "Security model")
    index = sharded / "model.safetensors.index.json"
    shard = sharded / json.loads(index.read_text())["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    path = {"index": index, "shard": shard, "model folder": sharded}[which]
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    at.selectbox(key="sb_model").set_value(FOLDER_LABEL).run()
    at.selectbox(key="sb_group").set_value(32).run()
    at.text_input(key="sb_folder").set_value(str(path)).run()
    at.switch_page("pages/weights_page.py").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    layers = at.selectbox(key="w_layer").options
    assert any("mlp.down_proj" in option for option in layers)
    at.switch_page("pages/model_page.py").run()
    assert not at.exception and not at.error, [e.value for e in at.error]


def test_a_missing_path_is_a_message_in_the_sidebar(tmp_path):
    from pages.common import FOLDER_LABEL

    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    at.selectbox(key="sb_model").set_value(FOLDER_LABEL).run()
    at.text_input(key="sb_folder").set_value(str(tmp_path / "nothing-here")).run()
    assert not at.exception
    assert any("no such file or folder" in e.value for e in at.error)
