"""An orthogonal randomized Hadamard transform applied online: x -> x R in O(n log n), no n x n matmul.

R = diag(s) (A ⊗ H_b) / sqrt(k b) for a width n = k b: ``s`` random signs, ``H_b`` Sylvester's
Hadamard of the largest power of two b dividing n (a fast Walsh-Hadamard transform, ``fwht``), and
``A`` a k x k Hadamard matrix from compressed-tensors' library of known ones (random signs included)
for the factor k that is not a power of two. The bundled LM's down_proj input, 768 = 12 x 64,
gets A of order 12 and 64-point butterflies; a power of two gets k = 1. Where the library holds no
Hadamard of order k (n = 200 = 25 x 8: none of order 25), A is the identity and R is block-diagonal,
one Hadamard per block of b (orthogonal still, it mixes within blocks only); a warning says so.

Worked example, n = 4 (k = 1, b = 4), s = (1, -1, 1, 1): x = (1, 2, 3, 4), x * s = (1, -2, 3, 4);
butterflies of stride 1 give (1 + -2, 1 - -2, 3 + 4, 3 - 4) = (-1, 3, 7, -1), of stride 2
(-1 + 7, 3 + -1, -1 - 7, 3 - -1) = (6, 2, -8, 4); over sqrt(4): x R = (3, 1, -4, 2), and
|x R|^2 = |x|^2 = 30.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

log = logging.getLogger(__name__)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """x H_b along the last dimension (b a power of two), unnormalized; H_b is Sylvester's (symmetric)."""
    b = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < b:
        pairs = x.reshape(*lead, b // (2 * h), 2, h)  # (..., blocks, 2, h): element i pairs with i + h
        first, second = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack((first + second, first - second), dim=-2).reshape(*lead, b)
        h *= 2
    return x


def _odd_factor(size: int, seed: int) -> tuple[torch.Tensor, int]:
    """(A, b): a ±1 Hadamard A of order k = size / b, b the largest power of two it allows, from the library."""
    from compressed_tensors.transform import random_hadamard_matrix

    b = size & -size  # the largest power of two dividing size
    while b >= 1:
        k = size // b
        if k == 1:
            return torch.ones(1, 1, dtype=torch.float64), b
        try:
            A = random_hadamard_matrix(k, torch.float64, gen=torch.Generator().manual_seed(seed + 1))
            return A, b
        except ValueError:  # the library knows no Hadamard of order k: try a larger k (smaller b)
            b //= 2
    b = size & -size
    log.warning("no Hadamard matrix of order %d x 2^j divides %d: block-diagonal Hadamard rotation, blocks of %d",
                size // b, size, b)
    return torch.eye(size // b, dtype=torch.float64), b


class HadamardTransform(nn.Module):
    """x (..., n) -> x R, R orthogonal (see the module docstring), computed in at least fp32."""

    def __init__(self, size: int, seed: int = 0) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"a Hadamard transform needs a positive width, got {size}")
        A, b = _odd_factor(size, seed)
        signs = torch.randint(0, 2, (size,), generator=torch.Generator().manual_seed(seed)) * 2 - 1
        self.size, self.block = size, b
        # A ⊗ H_b has rows of squared norm |A's row|^2 b: k b for a Hadamard A, b for the identity
        self.norm = math.sqrt(b * float(A[0].square().sum()))
        self.register_buffer("signs", signs.double())  # (n,)
        self.register_buffer("odd", A)  # (k, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)  # bf16 butterflies would round at every stage
        k = self.odd.shape[0]
        y = (x.to(dtype) * self.signs.to(dtype)).reshape(*x.shape[:-1], k, self.block)  # (..., k, b)
        y = fwht(y)
        y = torch.einsum("...ib,ik->...kb", y, self.odd.to(dtype))  # Aᵀ Y: row vector times A ⊗ H_b
        return (y.reshape(x.shape) / self.norm).to(x.dtype)

    def matrix(self) -> torch.Tensor:
        """R as a dense (n, n) float64 matrix, to fuse into a weight: W (out, n) -> W R."""
        return self(torch.eye(self.size, dtype=torch.float64, device=self.signs.device))

    def extra_repr(self) -> str:
        return f"size={self.size}, odd={self.odd.shape[0]}, block={self.block}"
