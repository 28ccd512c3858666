"""What a block's linears see on the calibration tokens: H, channel statistics, the inputs.

- ``ActivationStats`` summarise the inputs of one linear per input channel (absmax, mean |x|,
  99th and 99.9th percentiles of |x|): the data behind the outlier views and AWQ's salience.
- ``LinearInputs`` add what the algorithms consume: GPTQ's H = 2XᵀX/n (fp32) and, on request,
  the raw inputs themselves.
- ``InputRecorder`` collects both with forward pre-hooks on a private copy of a block.

H and sum |x| are sums of per-batch partials (XᵀX in fp32, sum |x| in fp64) added along one fixed
binary tree over the global batch index (:class:`quantlab.calibrate.distributed.PairwiseSum`), so one
process and N torchrun ranks, each holding a share of the batches, get bit-identical statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from quantlab.calibrate import distributed
from quantlab.recipe import jsonable

MAX_STAT_ROWS = 8192  # token rows kept per linear for the percentiles; bounds memory on long sets


def accumulate_hessian(inp: torch.Tensor, H: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    """Add a batch of inputs (..., in) to the running H = 2XᵀX/n (fp32, updated in place and returned).

    The running mean is rescaled before adding, so H stays O(1) whatever the token count, and the
    inputs are scaled by sqrt(2/n) before the product (the reference's order of operations).
    """
    X = inp.reshape(-1, inp.shape[-1]).float()  # (tokens, in)
    added = X.shape[0]
    H.mul_(n / (n + added))
    n += added
    X = X * math.sqrt(2 / n)
    H.addmm_(X.t(), X)  # (in, in)
    return H, n


@dataclass(frozen=True)
class ActivationStats:
    """Per-input-channel magnitudes of one linear's inputs over the calibration tokens. Shapes (in,)."""

    absmax: torch.Tensor
    mean_abs: torch.Tensor
    n_tokens: int
    p99: torch.Tensor | None = None  # 99th percentile of |x| per channel over a strided sample of tokens
    p999: torch.Tensor | None = None  # 99.9th percentile; both only when collected with percentiles=True

    def to_dict(self) -> dict:
        return jsonable({"absmax": self.absmax, "mean_abs": self.mean_abs, "p99": self.p99, "p999": self.p999,
                         "n_tokens": self.n_tokens})


@dataclass(frozen=True)
class LinearInputs:
    """What one linear saw: GPTQ's Hessian, channel statistics and (optionally) the inputs."""

    hessian: torch.Tensor  # (in, in) fp32, H = 2XᵀX/n
    n_tokens: int
    stats: ActivationStats
    inputs: list[torch.Tensor] | None  # raw inputs, one tensor per batch (shared by linears fed by one op)


class _InputAccumulator:
    """Per-batch XᵀX and sum |x| (into a ``PairwiseSum``), absmax and a strided sample of rows for one input.

    Each batch's XᵀX is an fp32 partial (the reference keeps its running H in fp32 too) summed along
    the fixed tree: the rounding never depends on the batching of the other ranks, and a pairwise sum
    in fp32 errs by ~log2(batches) roundings where the reference's running mean errs by ~batches.
    Not fp64: the tree holds up to 1 + log2(batches) partials of (in, in) at once, and in fp64 those
    were a block's peak (5 x 190 MB for Qwen2.5-0.5B's down_proj, 1.6 GB each at Llama-3-8B's 14,336
    inputs). sum |x| is (in,) and stays fp64.
    """

    def __init__(self, row_stride: int | None, keep_inputs: bool, first_leaf: int, token_offset: int) -> None:
        self.row_stride = row_stride  # None: no sample, no percentiles
        self.sums = distributed.PairwiseSum(first_leaf)  # (XᵀX (in, in) fp32, sum |x| (in,) fp64)
        self.token_offset = token_offset  # tokens of the calibration set before this rank's share
        self.n = 0
        self.absmax: torch.Tensor | None = None
        self.rows: list[torch.Tensor] = []
        self.inputs: list[torch.Tensor] | None = [] if keep_inputs else None

    def add(self, x: torch.Tensor) -> None:
        X = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)
        if self.absmax is None:
            self.absmax = torch.zeros(X.shape[1], dtype=torch.float32, device=X.device)
        n_before = self.n
        self.n += X.shape[0]
        A = X.abs()
        self.sums.add((X.t() @ X, A.sum(dim=0, dtype=torch.float64)))
        self.absmax = torch.maximum(self.absmax, A.amax(dim=0))
        if self.row_stride is not None:
            offset = (-(self.token_offset + n_before)) % self.row_stride  # the global stride across batches and ranks
            self.rows.append(A[offset :: self.row_stride])
        if self.inputs is not None:
            self.inputs.append(x.detach())

    def finish(self) -> LinearInputs:
        xtx, sum_abs = self.sums.total()
        (n,) = distributed.sum_int([self.n], self.absmax.device)
        absmax = distributed.max_(self.absmax)
        p99 = p999 = None
        if self.row_stride is not None:
            rows = distributed.gather_rows(torch.cat(self.rows))  # (<= MAX_STAT_ROWS, in), in global token order
            p99, p999 = _column_quantiles(rows, (0.99, 0.999))
        stats = ActivationStats(
            absmax=absmax.cpu(), mean_abs=(sum_abs / max(n, 1)).float().cpu(), n_tokens=n,
            p99=None if p99 is None else p99.cpu(), p999=None if p999 is None else p999.cpu(),
        )
        inputs = self.inputs
        if inputs is not None and distributed.is_distributed():
            inputs = [distributed.gather_rows(torch.cat(inputs))]  # every rank's batches, in global order
        return LinearInputs(xtx.mul_(2 / max(n, 1)), n, stats, inputs)  # the tree's own sum: no second (in, in)


def _column_quantiles(rows: torch.Tensor, qs: tuple[float, ...]) -> list[torch.Tensor]:
    """Per-column high quantiles (the ceil(q*n)-th smallest value) from one top-k of the largest values.

    topk over contiguous rows of the transposed sample is several times faster than kthvalue down
    the columns, and one call serves every q.
    """
    n = rows.shape[0]
    ks = [min(n, max(1, math.ceil(q * n))) for q in qs]  # 1-based ascending ranks
    largest = rows.t().contiguous().topk(n - min(ks) + 1, dim=1).values  # (in, m), descending
    return [largest[:, n - k] for k in ks]


class InputRecorder:
    """Forward pre-hooks on a (private) block's linears that accumulate ``LinearInputs``.

    Linears fed by the very same tensor (q/k/v after one norm, gate/up) share one accumulator, so
    H is computed once per distinct input, not once per linear.
    """

    def __init__(self, linears: dict[str, nn.Module], total_tokens: int, keep_inputs: bool,
                 percentiles: bool = False, n_batches: int = 0) -> None:
        """``total_tokens`` and ``n_batches``: what this process will run (its share under torchrun)."""
        tokens, batches = distributed.all_ints(total_tokens), distributed.all_ints(n_batches)
        rank = distributed.rank()
        self.first_leaf, self.token_offset = sum(batches[:rank]), sum(tokens[:rank])
        self.row_stride = max(1, math.ceil(sum(tokens) / MAX_STAT_ROWS)) if percentiles else None
        self.keep_inputs = keep_inputs
        self.accumulators: dict[str, _InputAccumulator] = {}
        self.aliases: dict[str, str] = {}  # linear -> the linear whose accumulator it shares
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}  # id -> (tensor, linear) in the current batch
        self._handles = [module.register_forward_pre_hook(self._hook(name)) for name, module in linears.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            seen = self._seen.get(id(x))
            if seen is not None and seen[0] is x:
                self.aliases[name] = seen[1]
                return
            self._seen[id(x)] = (x, name)
            if name not in self.accumulators:
                self.accumulators[name] = _InputAccumulator(self.row_stride, self.keep_inputs, self.first_leaf,
                                                            self.token_offset)
            self.accumulators[name].add(x)
        return hook

    def next_batch(self) -> None:
        self._seen.clear()  # drop the references: ids may be reused by the next batch's tensors

    def finish(self) -> dict[str, LinearInputs]:
        for handle in self._handles:
            handle.remove()
        self._seen.clear()
        done = {name: acc.finish() for name, acc in self.accumulators.items()}
        done.update({name: done[source] for name, source in self.aliases.items()})
        return done
