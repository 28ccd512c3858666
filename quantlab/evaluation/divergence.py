"""How far a quantized model's predictions moved from its full-precision self: KL and top-1 agreement.

What llama.cpp's perplexity tool reports with ``--kl-divergence``: over the same scored positions,
the mean of KL(P_fp || P_q) and the share of positions whose most likely next token is unchanged.
Both are computed in the quantized model's own perplexity pass, against one of two references:

- **the full-precision model** (``compare_logits``, or ``perplexity(..., reference=model_fp)``):
  both models run on each batch and KL is exact over the whole vocabulary. Nothing is stored.
- **cached top-k log-probs** (``reference_logprobs``, computed once, then reused by every quantized
  variant of a sweep at the cost of one pass each). Full-vocabulary log-probs of every position do
  not fit (the bundled model's held-out text: 180k positions x 4096 tokens x 4 bytes = 3 GB; a 150k
  vocabulary is 37x that), so per position the ``top_k`` largest log-probs and their token ids are
  kept (``top_k x 8`` bytes) and KL is computed on the distribution coarsened to those tokens plus
  one bucket for the rest of the mass. By the data-processing inequality that is a lower bound on
  the full KL, exact when ``top_k`` covers the vocabulary; the result reports the probability mass
  the kept tokens hold, which says how tight the bound is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from quantlab.errors import FormatError

TINY = 1e-12  # floor for the rest-of-vocabulary mass before its log: it can round to 0 or below


@dataclass(frozen=True)
class DivergenceResult:
    """KL(P_fp || P_q) and top-1 agreement over the scored positions of one evaluation."""

    kl_divergence: float  # mean over positions, nats
    kl_p99: float  # 99th percentile over positions: the rare tokens where quantization hurt most
    top1_agreement: float  # share of positions whose argmax token is unchanged, 0..1
    positions: int
    top_k: int  # reference tokens kept per position
    exact: bool  # True when top_k covered the whole vocabulary, so KL is not a lower bound
    reference_mass: float  # mean full-precision probability in the kept tokens: how tight the bound is

    def definitions(self) -> dict[str, str]:
        scope = "full vocabulary" if self.exact else (
            f"full-precision top-{self.top_k} tokens (holding {self.reference_mass:.0%} of its probability) "
            "+ one bucket for the rest: a lower bound")
        return {
            "kl_divergence": f"mean KL(P_fp || P_q) in nats over {self.positions:,} positions, {scope}",
            "kl_p99": "99th percentile of the per-position KL",
            "top1_agreement": "share of positions whose most likely next token is the same as full precision's",
        }

    def to_dict(self) -> dict:
        return {"kl_divergence": self.kl_divergence, "kl_p99": self.kl_p99, "top1_agreement": self.top1_agreement,
                "kl_positions": self.positions, "kl_top_k": self.top_k, "kl_exact": self.exact,
                "kl_reference_mass": self.reference_mass}


@dataclass(frozen=True)
class ReferenceLogProbs:
    """The full-precision model's top-k log-probs at every scored position, in stream order."""

    values: torch.Tensor  # (T, k) fp32 log-probs, sorted descending: column 0 is the argmax
    indices: torch.Tensor  # (T, k) int32 token ids
    vocab_size: int
    fingerprint: tuple  # (ctx, stride, prepend_bos, n_tokens, hash of ids): the windows these belong to
    result: object  # the full-precision PerplexityResult of the same pass

    def check_matches(self, fingerprint: tuple) -> None:
        if fingerprint != self.fingerprint:
            ctx, stride, bos, n, _ = self.fingerprint
            raise FormatError(f"the reference was computed on other windows (ctx {ctx}, stride {stride}, "
                              f"prepend_bos {bos}, {n} tokens); evaluate with the same text and settings")


class TopKCollector:
    """Keeps the top-k log-probs of each scored position while the full-precision model is scored."""

    def __init__(self, top_k: int):
        self.top_k = top_k
        self.values: list[torch.Tensor] = []
        self.indices: list[torch.Tensor] = []
        self.vocab_size = 0

    def update(self, logprobs: torch.Tensor, targets: torch.Tensor) -> None:  # logprobs (n, V) fp32
        self.vocab_size = logprobs.shape[-1]
        values, indices = logprobs.topk(min(self.top_k, self.vocab_size), dim=-1, sorted=True)  # (n, k)
        self.values.append(values.cpu())
        self.indices.append(indices.to(torch.int32).cpu())

    def reference(self, fingerprint: tuple, result) -> ReferenceLogProbs:
        return ReferenceLogProbs(torch.cat(self.values), torch.cat(self.indices), self.vocab_size, fingerprint, result)


class DivergenceAccumulator:
    """Compares the quantized model's log-probs, batch by batch, with the reference's for the same positions.

    ``reference_batches`` gives, per batch, the reference's log-probs and token ids: (n, k) top-k
    values and ids from a cache (a :class:`CachedBatches`, sliced to each batch's size), or an
    iterator of (n, V) full log-probs and ``None`` from a paired full-precision pass (exact).
    """

    def __init__(self, reference_batches):
        self.reference_batches = reference_batches if isinstance(reference_batches, CachedBatches) \
            else iter(reference_batches)
        self.kept = 0  # reference tokens per position
        self.vocab_size = 0
        self.kl: list[torch.Tensor] = []
        self.agree = 0
        self.positions = 0
        self.mass = 0.0

    def update(self, logprobs: torch.Tensor, targets: torch.Tensor) -> None:  # logprobs (n, V) fp32
        if isinstance(self.reference_batches, CachedBatches):
            ref_values, ref_indices = self.reference_batches.take(logprobs.shape[0])
        else:
            ref_values, ref_indices = next(self.reference_batches)
        ref_values = ref_values.to(logprobs.device)
        if ref_values.shape[0] != logprobs.shape[0]:
            raise FormatError(f"the reference has {ref_values.shape[0]} positions for a batch of {logprobs.shape[0]}")
        self.kept, self.vocab_size = ref_values.shape[1], logprobs.shape[1]
        if ref_indices is None:  # full vocabulary, in token order
            kl, ref_top1 = full_kl(ref_values, logprobs), ref_values.argmax(dim=-1)
            self.mass += ref_values.shape[0]
        else:
            ref_indices = ref_indices.to(logprobs.device).long()  # (n, k)
            exact = self.kept >= self.vocab_size
            kl = coarse_kl(ref_values, logprobs.gather(1, ref_indices), with_rest=not exact)
            ref_top1 = ref_indices[:, 0]
            self.mass += float(ref_values.double().exp().sum())
        self.kl.append(kl.cpu())
        self.agree += int((logprobs.argmax(dim=-1) == ref_top1).sum())
        self.positions += logprobs.shape[0]

    def result(self) -> DivergenceResult:
        kl = torch.cat(self.kl).numpy()
        return DivergenceResult(
            kl_divergence=float(kl.mean()), kl_p99=float(np.percentile(kl, 99)),
            top1_agreement=self.agree / self.positions, positions=self.positions,
            top_k=self.kept, exact=self.kept >= self.vocab_size,
            reference_mass=min(1.0, self.mass / self.positions),
        )


class CachedBatches:
    """A cached reference read in stream order, as many positions at a time as each batch scores."""

    def __init__(self, reference: ReferenceLogProbs):
        self.reference = reference
        self.offset = 0

    def take(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        begin, self.offset = self.offset, self.offset + n
        return self.reference.values[begin : self.offset], self.reference.indices[begin : self.offset]


def full_kl(p_logprobs: torch.Tensor, q_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-row KL(P || Q) over the whole vocabulary: (n, V), (n, V) -> (n,) float64.

    Terms in fp32 (a float64 copy of (n, V) would double the memory), each row summed in float64.
    """
    return (p_logprobs.exp() * (p_logprobs - q_logprobs)).sum(dim=-1, dtype=torch.float64)


def coarse_kl(p_logprobs: torch.Tensor, q_logprobs: torch.Tensor, with_rest: bool = True) -> torch.Tensor:
    """Per-row KL(P || Q) over k kept tokens plus one bucket for the rest: (n, k), (n, k) -> (n,).

    Float64, because for nearly identical models the KL (~1e-4) is the small difference of large
    terms and the rest mass is 1 minus a sum close to 1. ``with_rest=False`` when the k tokens are
    the whole vocabulary: the "rest" would be rounding noise of the fp32 log-probs.
    """
    p_log, q_log = p_logprobs.double(), q_logprobs.double()
    kept = (p_log.exp() * (p_log - q_log)).sum(dim=-1)  # (n,)
    if not with_rest:
        return kept
    p_rest = (1 - p_log.exp().sum(dim=-1)).clamp_min(0)  # (n,)
    q_rest = (1 - q_log.exp().sum(dim=-1)).clamp_min(TINY)  # (n,)
    rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(TINY).log() - q_rest.log()), torch.zeros_like(p_rest))
    return kept + rest
