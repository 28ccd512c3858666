"""Export NVFP4 and MXFP4 runs as compressed-tensors ``nvfp4-pack-quantized`` / ``mxfp4-pack-quantized``.

Per quantized linear ``NAME`` the folder holds what the library's own compressor writes::

    NAME.weight_packed        uint8 (out, in / 2): two E2M1 codes per byte, the first in the low nibble
    NAME.weight_scale         (out, in / 16) float8_e4m3fn (NVFP4) or (out, in / 32) uint8 E8M0 exponents (MXFP4)
    NAME.weight_global_scale  (1,) fp32, NVFP4 only

and ``config.json``'s ``quantization_config`` has one config group with the preset's weight
arguments (``NVFP4A16`` / ``MXFP4A16``). The library does the work here: the scheme, the config,
and ``NVFP4PackedCompressor`` / ``MXFP4PackedCompressor.compress``, which re-derive the codes from a
float weight with the stored scales. QuantLab hands it the dequantized weight in fp32 (every value
is code x working scale), so the codes come back exactly: x / s lands within one fp32 rounding of
an E2M1 value, far from the midpoints where rounding could change it.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from quantlab.errors import FormatError
from quantlab.models.quantized import QuantizedLinear
from quantlab.numerics.formats import QuantFormat
from quantlab.numerics.primitives import dequantize

# QuantLab kind -> (compressed-tensors preset whose weight arguments it reproduces, compression format)
BLOCK_EXPORTS = {"nvfp4": ("NVFP4A16", "nvfp4-pack-quantized"), "mxfp4": ("MXFP4A16", "mxfp4-pack-quantized")}


def check_exportable(name: str, fmt: QuantFormat) -> None:
    if fmt.kind not in BLOCK_EXPORTS:
        raise FormatError(f"{name} is {fmt.name}; of the block formats only {', '.join(BLOCK_EXPORTS)} export "
                          "(as compressed-tensors nvfp4-/mxfp4-pack-quantized)")


def block_scheme(fmt: QuantFormat):
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    preset, format_name = BLOCK_EXPORTS[fmt.kind]
    weights = PRESET_SCHEMES[preset]["weights"].model_copy(deep=True)
    return QuantizationScheme(targets=["Linear"], weights=weights, format=format_name)


def block_quantization_config(fmt: QuantFormat, ignored: tuple[str, ...]):
    from compressed_tensors.quantization import QuantizationConfig

    scheme = block_scheme(fmt)
    return QuantizationConfig(config_groups={"group_0": scheme}, ignore=list(ignored), format=scheme.format,
                              quantization_status="compressed")


def _compressor(fmt: QuantFormat):
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor

    return {"nvfp4": NVFP4PackedCompressor, "mxfp4": MXFP4PackedCompressor}[fmt.kind]


def block_layer_tensors(name: str, module: QuantizedLinear) -> dict[str, torch.Tensor]:
    """One NVFP4/MXFP4 linear as the library's compressor stores it."""
    fmt = module.fmt
    check_exportable(name, fmt)
    if module.in_perm is not None:  # GPTQ keeps block formats in input order; a permuted one has no g_idx here
        raise FormatError(f"{name}: permuted columns cannot be described in {BLOCK_EXPORTS[fmt.kind][1]}")
    qt = module.quantized
    scale = qt.qparams.scale.float().reshape(qt.codes.shape[0], -1)  # (out, groups): the stored scale's value
    state = {"weight": dequantize(replace(qt, dtype=torch.float32)), "weight_scale": scale}
    if qt.qparams.global_scale is not None:
        state["weight_global_scale"] = qt.qparams.global_scale.reshape(1)
    compressed = _compressor(fmt).compress(state, block_scheme(fmt))
    out = {f"{name}.{key}": value.detach().contiguous() for key, value in compressed.items()}
    if module.bias is not None:
        out[f"{name}.bias"] = module.bias.detach().contiguous()
    return out


def decompress_layer(tensors: dict[str, torch.Tensor], name: str, fmt: QuantFormat) -> torch.Tensor:
    """The weight of ``name`` as the library's decompression gives it (bf16, as the library returns it)."""
    prefix = f"{name}."
    state = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
    return _compressor(fmt).decompress(state, block_scheme(fmt))["weight"]
