"""Long runs: calibration sized to the device, what will run said up front, time per block, Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from quantlab.recipe import CPU_LARGE_CALIB, GPU_LARGE_CALIB, CalibConfig, parse_config_name
from quantlab.runs.pipeline import plan_run, quantize_model
from quantlab.runs.progress import BlockClock, format_seconds


def qwen_shape(device: str) -> torch.nn.Module:
    """Qwen2.5-0.5B's width and vocabulary (over 50M parameters), 2 blocks, built without weights."""
    config = Qwen2Config(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=2,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32_768)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config)


def test_large_models_get_the_calibration_set_of_their_device():
    on_cpu = CalibConfig.for_model(qwen_shape("meta"))
    assert (on_cpu.n_samples, on_cpu.seq_len) == CPU_LARGE_CALIB
    assert CalibConfig.for_model(qwen_shape("meta"), n_samples=4).n_samples == 4  # the user's choice wins


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_large_models_get_the_gptq_paper_set():
    config = CalibConfig.for_model(qwen_shape("cuda"))
    assert (config.n_samples, config.seq_len) == GPU_LARGE_CALIB


def test_block_clock_reports_time_per_block_and_time_left():
    now = [0.0]
    clock = BlockClock(24, clock=lambda: now[0])
    assert clock.note(0.0) == ""  # nothing known before the probe block is done
    now[0] = 12.0
    assert clock.note(1 / 24) == ", 12.0 s/block, 4m36s left"
    now[0] = 30.0
    assert clock.note(2 / 24) == ", 15.0 s/block, 5m30s left"
    assert format_seconds(4000) == "1h06m"


def test_progress_messages_carry_the_time_left(bundled_lm):
    messages = []
    config = parse_config_name("int4-g64", calib=CalibConfig(n_samples=2, seq_len=32))
    quantize_model(bundled_lm, config, lambda f, m: messages.append(m), evaluate_quality=False)
    blocks = [m for m in messages if "block " in m and " of " in m]
    assert len(blocks) == bundled_lm.structure.n_blocks
    assert "left" not in blocks[0] and all("s/block" in m and "left" in m for m in blocks[1:])
    plan = plan_run(bundled_lm, config).describe()
    assert "2 x 32 = 64 calibration tokens through 4 blocks (28 linears) on cpu" in plan


def test_ctrl_c_stops_with_one_line(bundled_lm_path):
    argv = [sys.executable, "-m", "quantlab", "-v", "quantize", str(bundled_lm_path), "--method", "gptq",
            "--calib-samples", "128", "--calib-len", "256"]
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    started = time.monotonic()
    for line in process.stderr:  # -v logs each step: wait until the run itself has started
        if "calibration tokens through" in line or time.monotonic() - started > 300:
            break
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=300)
    assert process.returncode == 130
    assert "Traceback" not in rest and rest.strip().splitlines()[-1].startswith("quantlab quantize: interrupted")
