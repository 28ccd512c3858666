"""``python -m quantlab inspect`` and ``size``: JSON contracts, text output and bad input (exit 2, one line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tiny
from safetensors.torch import save_file

from quantlab.cli import main
from quantlab.numerics.formats import QuantFormat
from quantlab.models.loading import inspect_tensors, model_size

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "quantlab", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=600)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "tiny.safetensors"
    state = build_tiny("opt").state_dict()
    save_file({k: v for k, v in state.items() if k != "lm_head.weight"}, path)  # tied to the embedding
    return path


def test_inspect_json_lists_every_tensor(tiny_file):
    result = run_cli("inspect", str(tiny_file), "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert set(document) == {"tensors", "total_params", "total_bytes"}
    expected = inspect_tensors(tiny_file)
    assert document["total_bytes"] == expected.total_bytes and document["total_params"] == expected.total_params
    first = document["tensors"][0]
    assert set(first) == {"name", "shape", "dtype", "bytes"}
    assert {t["name"]: t["shape"] for t in document["tensors"]}["model.decoder.layers.0.fc1.weight"] == [128, 64]


def test_size_json_of_the_bundled_lm(bundled_lm, capsys):
    assert main(["size", "--format", "int4", "--group-size", "128", "--json"]) == 0  # default source: bundled LM
    document = json.loads(capsys.readouterr().out)
    expected = model_size(bundled_lm, QuantFormat.parse("int4-g128"))
    assert document["bits_per_weight"] == pytest.approx(4 + 16 / 128)
    assert document["total_bytes"] == expected.total_bytes
    assert document["quantized_bytes"] + document["full_precision_bytes"] == document["total_bytes"]
    assert {layer["role"] for layer in document["layers"] if layer["quantized"]} == {
        "q", "k", "v", "o", "gate", "up", "down"}


def test_bad_input_is_one_line_and_exit_2_from_the_shell():
    result = run_cli("size", "--format", "int4", "--group-size", "96")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "group size 96" in result.stderr and "[16, 32, 64, 128, 256]" in result.stderr


@pytest.mark.parametrize("options, expected", [
    (["--asym", "--scale-dtype", "fp32"], 4 + 32 / 32 + 4 / 32),
    ([], 4 + 16 / 32),
    (["--scale-dtype", "bf16", "--keep", "embed", "lm_head", "norm", "down"], 4 + 16 / 32),
])
def test_size_options_reach_the_format(tiny_file, capsys, options, expected):
    assert main(["size", str(tiny_file), "--format", "int4", "--group-size", "32", "--json", *options]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["bits_per_weight"] == pytest.approx(expected)
    quantized = {layer["name"] for layer in document["layers"] if layer["quantized"]}
    assert any("fc2" in name for name in quantized) == ("down" not in options)


@pytest.mark.parametrize("fmt, group_size, bits", [
    ("int8", "0", 8 + 16 / 64), ("int2", "64", 2 + 16 / 64), ("fp8-e4m3", "0", 8 + 16 / 64), ("nf4", "64", 4.25),
])
def test_size_formats(tiny_file, capsys, fmt, group_size, bits):
    assert main(["size", str(tiny_file), "--format", fmt, "--group-size", group_size, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    weights = sum(layer["params"] for layer in document["layers"] if layer["quantized"])
    rows = sum(layer["shape"][0] for layer in document["layers"] if layer["quantized"])
    if group_size == "0":  # per-channel: one fp16 scale per row, rows of 64 or 128 inputs
        bits = (weights * 8 + rows * 16) / weights
    assert document["bits_per_weight"] == pytest.approx(bits)


def test_text_output_is_readable(tiny_file, capsys):
    assert main(["inspect", str(tiny_file)]) == 0
    text = capsys.readouterr().out
    assert "model.decoder.layers.1.fc2.weight" in text and "64x128" in text and "float32" in text
    assert main(["size", str(tiny_file), "--format", "int4", "--group-size", "64"]) == 0
    text = capsys.readouterr().out
    assert "int4-g64" in text and "bits per quantized weight" in text and "kept" in text


@pytest.mark.parametrize("argv, message", [
    (["inspect", "missing.safetensors"], "no such file"),
    (["inspect", "{corrupt}"], "not a valid safetensors file"),
    (["size", "{corrupt}"], "not a valid safetensors file"),
    (["size", "{tiny}", "--format", "nf4", "--group-size", "-1"], "per-tensor"),
    (["size", "{tiny}", "--format", "fp8-e5m2", "--asym"], "symmetric"),
    (["size", "{tiny}", "--group-size", "-3"], "group size -3"),
    (["size", "quantlab-tests/not-cached", "--format", "int4"], "offline"),
    (["inspect", "quantlab-tests/not-cached"], "bundled model"),
    (["size", "{floats}", "--format", "int4"], "no linear layers"),
])
def test_bad_input_gives_one_line_and_exit_2(tmp_path, tiny_file, capsys, monkeypatch, argv, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10" + bytes(7) + b"{")
    save_file({"norm.weight": torch.ones(8)}, tmp_path / "floats.safetensors")
    paths = {"corrupt": tmp_path / "corrupt.safetensors", "tiny": tiny_file, "floats": tmp_path / "floats.safetensors"}
    assert main([arg.format(**paths) for arg in argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err


@pytest.mark.parametrize("argv", [["size", "--format", "int9"], ["size", "--group-size", "x"], ["nonsense"]])
def test_argument_errors_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("flags, expected", [
    ([], (True, True)),  # llm-compressor's actorder="static": act-order with group scales from the original weights
    (["--no-act-order"], (False, False)),  # the old behaviour: column order, groups chosen as the loop reaches them
    (["--act-order", "--no-static-groups"], (True, False)),
])
def test_gptq_order_flags(tiny_llama, flags, expected):
    from quantlab.cli import build_parser
    from quantlab.cli.quantize_cmd import config_from_args

    args = build_parser().parse_args(["quantize", "--method", "gptq", "--format", "int4", "--group-size", "32",
                                      "--restricted", *flags])
    config = config_from_args(args, tiny_llama)
    assert (config.gptq.act_order, config.gptq.static_groups) == expected
    assert (config.gptq.damp, config.gptq.block_size) == (0.01, 128)
    assert config.to_dict()["gptq"] == {"damp": 0.01, "block_size": 128, "act_order": expected[0],
                                        "static_groups": expected[1]}  # stated in the run's record
    assert config.weight_format.name == "int4-g32-restricted"
