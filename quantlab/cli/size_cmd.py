"""Size of a model in a quantization format: packed weights, scales, zero-points and kept layers."""

from __future__ import annotations

import argparse
import dataclasses
from collections import defaultdict

from quantlab.cli import emit, int_option
from quantlab.numerics.formats import SCALE_DTYPES, Granularity, QuantFormat

BUNDLED_LM = "pystdlib-llama-4m"  # quantlab.models.loading.BUNDLED_LM, without importing transformers for --help

FORMATS = tuple(f"int{b}" for b in range(2, 9)) + ("fp8-e4m3", "fp8-e5m2", "nf4")


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source", nargs="*",
        help=f"hub id, model folder, or .safetensors file(s) or a shard index (default: {BUNDLED_LM})",
    )
    parser.add_argument("--format", default="int4", choices=FORMATS, help="number format (default int4)")
    parser.add_argument("--group-size", type=int_option(-2**31, 2**20), default=None,
                        help="values per scale along the input: N>0 groups, 0 per-channel, -1 per-tensor "
                             "(default: per-channel, 64 for nf4)")
    parser.add_argument("--asym", action="store_true", help="asymmetric integers (adds a zero-point per scale)")
    parser.add_argument("--scale-dtype", default="fp16", choices=sorted(SCALE_DTYPES), help="how scales are stored")
    parser.add_argument("--keep", nargs="+", default=None, metavar="PATTERN",
                        help="name fragments or roles (down, qkv, ...) of layers to keep in full precision "
                             "(default: embeddings, norms, lm_head)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the hub")
    parser.add_argument("--json", action="store_true", help="print JSON with bits_per_weight, total_bytes, layers")


def format_from_args(args: argparse.Namespace) -> QuantFormat:
    """The QuantFormat that ``--format/--group-size/--asym/--restricted/--scale-dtype`` describe."""
    suffix = ("-asym" if args.asym else "") + ("-restricted" if getattr(args, "restricted", False) else "")
    fmt = QuantFormat.parse(args.format + suffix, scale_dtype=args.scale_dtype)
    if args.group_size is None:
        return fmt
    return dataclasses.replace(fmt, granularity=Granularity.from_group_size(args.group_size))


def run(args: argparse.Namespace) -> int:
    # Imported here: every command module is imported to build the parser, and transformers is slow.
    from quantlab.models.loading import inspect_tensors, is_weights_source, model_size, model_skeleton

    fmt = format_from_args(args)
    source = args.source[0] if len(args.source) == 1 else (args.source or None)
    if is_weights_source(source):
        target = inspect_tensors(source)
    else:
        target = model_skeleton(source, trust_remote_code=args.trust_remote_code)
    size = model_size(target, fmt, keep_full_precision=tuple(args.keep) if args.keep else None)
    emit(size.to_dict(), args.json, describe(size))
    return 0


def describe(size) -> str:
    """Human-readable summary: totals, then bytes per role."""
    by_role: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for layer in size.layers:
        by_role[layer.role][0] += layer.params
        by_role[layer.role][1] += layer.quant_bytes
    lines = [
        f"format {size.fmt_name}: {size.bits_per_weight:.3f} bits per quantized weight",
        f"quantized   {size.quantized_params:>14,} params {size.quantized_bytes:>14,} bytes "
        f"(codes {size.weight_bytes:,}, scales {size.scale_bytes:,}, zero-points {size.zero_point_bytes:,})",
        f"kept        {size.full_precision_params:>14,} params {size.full_precision_bytes:>14,} bytes",
        f"total       {size.total_bytes:>37,} bytes ({size.total_bytes / 2**20:.2f} MiB), "
        f"{size.compression:.2f}x smaller than {size.original_bytes:,}",
        "",
        f"{'role':<10} {'params':>14} {'bytes':>14}",
    ]
    lines += [f"{role:<10} {params:>14,} {nbytes:>14,}" for role, (params, nbytes) in by_role.items()]
    return "\n".join(lines)
