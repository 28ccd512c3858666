"""Measured latency per token and memory of real low-bit kernels (int8 on CPU; int4, fp8 on CUDA)."""

from __future__ import annotations

import argparse

from quantlab.cli import emit, int_option, printable
from quantlab.cli.size_cmd import BUNDLED_LM
from quantlab.runs.speed import (
    BASELINES, CPU_VARIANTS, CUDA_VARIANTS, SpeedResult, SpeedSettings, measure_speed, ratios, theoretical_bytes,
)


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", nargs="?", default=None,
                        help=f"hub id, model folder or bundled name (default: {BUNDLED_LM})")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated; CPU: {','.join(CPU_VARIANTS)}; CUDA: {','.join(CUDA_VARIANTS)} "
                             "(default: all of the device's)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--prompt-tokens", type=int_option(1, 2**16), default=SpeedSettings.prompt_tokens, help="prefill length")
    parser.add_argument("--decode-tokens", type=int_option(0, 2**16), default=SpeedSettings.decode_tokens,
                        help="greedy decode steps with the KV cache (causal LMs)")
    parser.add_argument("--repeats", type=int_option(1, 1000), default=SpeedSettings.repeats, help="timed runs; the median is shown")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the hub")
    parser.add_argument("--json", action="store_true", help="print JSON: results (measured), ratios, theoretical sizes")


def run(args: argparse.Namespace) -> int:
    from quantlab.models.loading import load_model  # here, not at the top: --help need not import transformers

    from quantlab.device import resolve_device

    settings = SpeedSettings(args.prompt_tokens, args.decode_tokens, args.repeats)
    resolve_device(args.device)  # a bogus --device fails before the model loads
    loaded = load_model(args.source, device="cpu", trust_remote_code=args.trust_remote_code)
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip()) if args.variants else None
    results = measure_speed(loaded.model, loaded.kind, loaded.name, variants, settings, args.device)
    theoretical = {r.variant: theoretical_bytes(loaded.model, r.variant) for r in results}
    relative = ratios(results) if _has_baseline(results) else {}
    document = {
        "model": loaded.name, "kind": loaded.kind, "device": results[0].device, "label": "measured",
        "results": [r.to_dict() | {"theoretical_bytes": theoretical[r.variant]} for r in results],
        "ratios": relative,
    }
    emit(document, args.json, describe(results, theoretical, relative))
    return 0


def _has_baseline(results: list[SpeedResult]) -> bool:
    wanted = BASELINES["cuda" if results[0].device.startswith("cuda") else "cpu"]
    return any(r.variant == wanted for r in results)


def describe(results: list[SpeedResult], theoretical: dict[str, int], relative: dict) -> str:
    first = results[0]
    lines = [
        f"{printable(first.model)}: measured on {first.device}, prompt {first.prompt_tokens} tokens"
        + (f", decode {first.decode_tokens} tokens" if first.decode_tokens else "")
        + f", median of {first.repeats}",
        f"{'variant':<18} {'prefill ms/tok':>14} {'decode ms/tok':>14} {'resident MiB':>13} "
        f"{'tensors MiB':>12} {'theory MiB':>11} {'speed-up':>9}",
    ]
    for r in results:
        decode = f"{r.decode_ms_per_token:.3f}" if r.decode_ms_per_token is not None else "-"
        ratio = relative.get(r.variant, {}).get("decode" if r.decode_ms_per_token else "prefill")
        speed_up = f"{1 / ratio:.2f}x" if ratio else "-"
        lines.append(f"{r.variant:<18} {r.prefill_ms_per_token:>14.3f} {decode:>14} {r.resident_bytes / 2**20:>13.2f} "
                     f"{r.tensor_bytes / 2**20:>12.2f} {theoretical[r.variant] / 2**20:>11.2f} {speed_up:>9}")
    lines.append("resident = measured memory growth; tensors = stored weight bytes; theory = QuantLab's size "
                 "accounting; speed-up = baseline / variant (decode for LMs)")
    return "\n".join(lines)
