"""llama.cpp's GGUF block types as size references: bytes per block from the published block structs.

Quality is not simulated: these are the sizes a GGUF file's tensors take, so that QuantLab's formats
can be put beside them. The layouts are those of ``ggml/src/ggml-common.h`` in ggml-org/llama.cpp
(``QK_K = 256``, ``K_SCALE_SIZE = 12``, ``ggml_half`` = 2 bytes)::

    block_q8_0  { ggml_half d; int8_t qs[32]; }                                   34 B / 32  = 8.5 bpw
    block_q4_0  { ggml_half d; uint8_t qs[16]; }                                  18 B / 32  = 4.5 bpw
    block_q4_K  { ggml_half d, dmin; uint8_t scales[12]; uint8_t qs[128]; }      144 B / 256 = 4.5 bpw
    block_q5_K  { ggml_half d, dmin; uint8_t scales[12], qh[32], qs[128]; }      176 B / 256 = 5.5 bpw
    block_q6_K  { uint8_t ql[128], qh[64]; int8_t scales[16]; ggml_half d; }     210 B / 256 = 6.5625 bpw

A block covers consecutive values of one row, so a row's length must be a multiple of the block.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantlab.errors import FormatError

HALF = 2  # bytes of ggml_half (fp16)
QK_K = 256  # values per K-quant super-block
K_SCALE_SIZE = 12  # bytes of the K-quants' packed 6-bit scales and mins


@dataclass(frozen=True)
class GGUFType:
    """One GGUF block type: how many values a block holds and what its struct's fields take."""

    name: str
    block_size: int  # values per block
    fields: tuple[tuple[str, int], ...]  # (struct field, bytes), in struct order
    description: str

    @property
    def block_bytes(self) -> int:
        return sum(n_bytes for _, n_bytes in self.fields)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.block_size

    def tensor_bytes(self, out_features: int, in_features: int) -> int:
        """Bytes of an (out, in) weight: every row cut into whole blocks."""
        if in_features % self.block_size:
            raise FormatError(f"{self.name} blocks hold {self.block_size} values; rows of {in_features} are not "
                              "a whole number of blocks")
        return out_features * (in_features // self.block_size) * self.block_bytes


GGUF_TYPES = (
    GGUFType("Q8_0", 32, (("d", HALF), ("qs", 32)), "32 int8 codes, one fp16 scale"),
    GGUFType("Q4_0", 32, (("d", HALF), ("qs", 32 // 2)), "32 4-bit codes, one fp16 scale"),
    GGUFType("Q4_K", QK_K, (("d", HALF), ("dmin", HALF), ("scales", K_SCALE_SIZE), ("qs", QK_K // 2)),
             "8 sub-blocks of 32 4-bit codes, 6-bit scales and mins, fp16 super-scales"),
    GGUFType("Q5_K", QK_K, (("d", HALF), ("dmin", HALF), ("scales", K_SCALE_SIZE), ("qh", QK_K // 8),
                            ("qs", QK_K // 2)),
             "8 sub-blocks of 32 5-bit codes, 6-bit scales and mins, fp16 super-scales"),
    GGUFType("Q6_K", QK_K, (("ql", QK_K // 2), ("qh", QK_K // 4), ("scales", QK_K // 16), ("d", HALF)),
             "16 sub-blocks of 16 6-bit codes, 8-bit scales, one fp16 super-scale"),
)


def gguf_type(name: str) -> GGUFType:
    for kind in GGUF_TYPES:
        if kind.name.lower() == name.strip().lower():
            return kind
    raise FormatError(f"unknown GGUF type {name!r}; the references are {', '.join(t.name for t in GGUF_TYPES)}")


def linear_bytes(kind: GGUFType, shapes: list[tuple[int, int]]) -> int | None:
    """Bytes of the linears of ``shapes`` (out, in) in ``kind``; None when a row is not whole blocks."""
    if any(in_features % kind.block_size for _, in_features in shapes):
        return None
    return sum(kind.tensor_bytes(out_features, in_features) for out_features, in_features in shapes)

