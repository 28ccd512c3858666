"""Measured int8-vs-fp32 latency and memory on this CPU, and the time to export the bundled LM.

Speed: every variant (fp32, bf16, int8 dynamic quantization = int8 weights and activations with
real int8 GEMMs) is built from a copy of the model and timed; the whole set is measured in
``--rounds`` rounds, variant after variant in each, so that load from other processes falls on all
of them alike, and the median over rounds is reported. Prefill is per prompt token, decode per
generated token with the KV cache; memory is the measured resident growth while building the
variant, and the stored weight bytes beside it.

Export: the bundled LM quantized with RTN (INT4 g128 symmetric and asymmetric, INT8 per channel),
written in compressed-tensors pack-quantized format; the time to write and the folder's weights
against QuantLab's size accounting.

    python bench/bench_speed_export.py [--prompt-tokens 128] [--decode-tokens 32] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantlab.recipe import CalibConfig, parse_config_name  # noqa: E402
from quantlab.runs.export import export_compressed  # noqa: E402
from quantlab.models.loading import BUNDLED_ENCODER, BUNDLED_LM, load_model, resolve_source  # noqa: E402
from quantlab.runs.pipeline import quantize_model  # noqa: E402
from quantlab.runs.speed import SpeedSettings, measure_speed  # noqa: E402

EXPORT_CONFIGS = ("rtn-int4-g128", "rtn-int4-g128-asym", "rtn-int8")
FIELDS = ("prefill_ms_per_token", "decode_ms_per_token", "resident_bytes", "tensor_bytes")


def median_results(loaded, settings: SpeedSettings, rounds: int) -> dict[str, dict[str, float]]:
    """Per variant, the median of each measured field over ``rounds`` rounds."""
    per_round = [measure_speed(loaded.model, loaded.kind, loaded.name, settings=settings, device="cpu")
                 for _ in range(rounds)]
    device = per_round[0][0].device
    medians = {}
    for index, result in enumerate(per_round[0]):
        values = {f: [r[index].to_dict()[f] for r in per_round] for f in FIELDS}
        medians[result.variant] = {f: statistics.median(v) if v[0] is not None else None for f, v in values.items()}
    medians["_device"] = device
    return medians


def print_speed(name: str, medians: dict) -> None:
    device = medians.pop("_device")
    print(f"\n{name}: measured on {device}")
    print(f"{'variant':<14} {'prefill ms/tok':>14} {'decode ms/tok':>14} {'resident MiB':>13} {'weights MiB':>12}")
    for variant, m in medians.items():
        decode = f"{m['decode_ms_per_token']:.3f}" if m["decode_ms_per_token"] is not None else "-"
        print(f"{variant:<14} {m['prefill_ms_per_token']:>14.3f} {decode:>14} "
              f"{m['resident_bytes'] / 2**20:>13.2f} {m['tensor_bytes'] / 2**20:>12.2f}")
    base, int8 = medians["fp32"], medians["int8-dynamic"]
    print(f"int8 / fp32: prefill time {int8['prefill_ms_per_token'] / base['prefill_ms_per_token']:.2f}x", end="")
    if base["decode_ms_per_token"] is not None:
        print(f", decode time {int8['decode_ms_per_token'] / base['decode_ms_per_token']:.2f}x", end="")
    print(f", resident memory {int8['resident_bytes'] / base['resident_bytes']:.2f}x, "
          f"weight bytes {int8['tensor_bytes'] / base['tensor_bytes']:.2f}x")


def bench_export(loaded, folder: Path) -> None:
    print(f"\nexport of {loaded.name} (compressed-tensors pack-quantized)")
    print(f"{'config':<20} {'quantize s':>10} {'export s':>9} {'weights bytes':>14} {'accounted':>12} {'diff':>7}")
    for name in EXPORT_CONFIGS:
        config = parse_config_name(name, calib=CalibConfig(n_samples=4, seq_len=128))
        start = time.perf_counter()
        model, run = quantize_model(loaded, config, evaluate_quality=False)
        quantize_s = time.perf_counter() - start
        result = export_compressed(model, folder / name, loaded.tokenizer)
        diff = (result.weights_bytes - run.total_bytes) / run.total_bytes
        print(f"{name:<20} {quantize_s:>10.2f} {result.seconds:>9.3f} {result.weights_bytes:>14,} "
              f"{run.total_bytes:>12,} {diff:>+7.2%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant per round (median)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all variants (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = SpeedSettings(args.prompt_tokens, args.decode_tokens, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        # A private copy: the bundled folder may be rewritten by a training run while we read it.
        lm_copy = Path(tmp) / BUNDLED_LM
        shutil.copytree(resolve_source(BUNDLED_LM), lm_copy)
        lm = load_model(lm_copy, device="cpu")
        print_speed(lm.name, median_results(lm, settings, args.rounds))
        encoder = load_model(BUNDLED_ENCODER, device="cpu")
        print_speed(encoder.name, median_results(encoder, settings, args.rounds))
        bench_export(lm, Path(tmp) / "exports")


if __name__ == "__main__":
    main()
