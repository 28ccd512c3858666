"""The ``quantization_config`` of an export: one config group per weight format, as compressed-tensors writes it.

A run in one format gets one group targeting every ``Linear``; a mixed-precision plan
(:mod:`quantlab.analysis.plan`) gets one group per format, each targeting its linears by exact module
name, under the top-level format ``pack-quantized`` when every group is an integer format and
``mixed-precision`` when an NVFP4/MXFP4 group sits beside them (compressed-tensors' own rule).
"""

from __future__ import annotations

from quantlab.models.quantized import QuantizedLinear
from quantlab.numerics.formats import QuantFormat
from quantlab.runs.blockexport import block_scheme


def format_groups(quantized: dict[str, QuantizedLinear]) -> dict[tuple, tuple[QuantFormat, list[str]]]:
    """The run's weight formats, each with the layers stored in it (one config group each), in first-seen order.

    Formats that store the same way (kind, bits, symmetry, granularity, range) are one group: the
    scale dtype travels with the scale tensors, the range method only chose the codes.
    """
    groups: dict[tuple, tuple[QuantFormat, list[str]]] = {}
    for name, module in quantized.items():
        fmt = module.fmt
        key = fmt.kind, fmt.n_bits, fmt.symmetric, fmt.granularity, fmt.symmetric_range
        groups.setdefault(key, (fmt, []))[1].append(name)
    return groups


def _int_scheme(fmt: QuantFormat, targets: list[str]):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    strategy = {"group": "group", "channel": "channel", "tensor": "tensor"}[fmt.granularity.kind]
    args = QuantizationArgs(
        num_bits=fmt.n_bits, type="int", symmetric=fmt.symmetric, strategy=strategy,
        group_size=fmt.granularity.group_size if strategy == "group" else None,
    )
    return QuantizationScheme(targets=targets, weights=args, format="pack-quantized")


def int_quantization_config(fmt: QuantFormat, ignored: tuple[str, ...]):
    from compressed_tensors.quantization import QuantizationConfig

    scheme = _int_scheme(fmt, ["Linear"])
    return QuantizationConfig(config_groups={"group_0": scheme}, ignore=list(ignored), format="pack-quantized",
                              quantization_status="compressed")


def mixed_quantization_config(groups: dict, ignored: tuple[str, ...]):
    """Several config groups, each targeting its layers by exact module name; ``mixed-precision`` when their
    compression formats differ (an NVFP4 group beside integer ones), else their one format."""
    from compressed_tensors.quantization import QuantizationConfig

    schemes = {}
    for i, (fmt, names) in enumerate(groups.values()):
        scheme = block_scheme(fmt) if fmt.is_block_scaled else _int_scheme(fmt, names)
        schemes[f"group_{i}"] = scheme.model_copy(update={"targets": list(names)})
    formats = {scheme.format for scheme in schemes.values()}
    top = formats.pop() if len(formats) == 1 else "mixed-precision"
    return QuantizationConfig(config_groups=schemes, ignore=list(ignored), format=top, quantization_status="compressed")
