"""List every tensor of a model or weights file: name, shape, dtype and bytes."""

from __future__ import annotations

import argparse

from quantlab.cli import emit, printable
from quantlab.cli.size_cmd import BUNDLED_LM


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source", nargs="*",
        help=f"hub id, model folder, or .safetensors / .bin file(s) or a shard index (default: {BUNDLED_LM})",
    )
    parser.add_argument("--json", action="store_true", help="print JSON: tensors, total_params, total_bytes")


def run(args: argparse.Namespace) -> int:
    from quantlab.models.loading import inspect_tensors  # late: transformers is slow to import (see size_cmd)

    source = args.source[0] if len(args.source) == 1 else (args.source or None)
    listing = inspect_tensors(source)
    names = [printable(t.name) for t in listing.tensors]  # a name may hold terminal escape sequences
    width = min(max((len(n) for n in names), default=4), 120)
    lines = [f"{'name':<{width}}  {'shape':<16} {'dtype':<10} {'bytes':>12}"]
    lines += [f"{name:<{width}}  {'x'.join(map(str, t.shape)) or 'scalar':<16} {t.dtype:<10} {t.bytes:>12,}"
              for name, t in zip(names, listing.tensors)]
    lines.append(f"{len(listing.tensors)} tensors, {listing.total_params:,} parameters, "
                 f"{listing.total_bytes:,} bytes ({listing.total_bytes / 2**20:.2f} MiB)")
    emit(listing.to_dict(), args.json, "\n".join(lines))
    return 0
