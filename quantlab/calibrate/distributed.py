"""Data-parallel calibration on torch.distributed (the engine llm-compressor's distributed oneshot uses).

Under ``torchrun --nproc_per_node N`` every rank holds the whole model and runs a disjoint,
contiguous share of the calibration batches through each block; the statistics the algorithms
read (H = 2XᵀX/n, channel absmax and mean |x|, the raw inputs of static observers) are then
combined so that every rank holds the very numbers a single process would have computed, and
derives the very same codes and scales. Outside torch.distributed every function here is a no-op
(one rank, all the batches), so the single-process path runs the same code.

Bit-identical sums whatever N: floating-point addition is commutative but not associative, so a
plain all-reduce (or a running mean) gives results that depend on how the batches were split.
``PairwiseSum`` instead adds per-batch partial sums (XᵀX in fp32, sum |x| in fp64) along one fixed binary tree over the
global batch index (batch b is leaf b; a node sums an aligned run of 2^k leaves). A rank owns a
contiguous run of leaves, sums the whole subtrees inside it, and hands the few partial nodes it
holds (at most 2·log2(batches)) to rank 0, which completes the same tree. Maxima and integer counts
are exact under any order and use a plain all-reduce.

What is not identical across *thread counts*: LAPACK's Cholesky (GPTQ) differs in its last bits
between 1 and 2 threads, so compare runs with the same threads per process (torchrun sets
OMP_NUM_THREADS=1 unless told otherwise).

``greedy_bin_packing`` and ``is_source_process`` come from compressed_tensors.distributed (the
helpers llm-compressor spreads modules with); its ``init_dist`` needs an accelerator, so
``init_from_env`` here also starts gloo on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Iterator
from datetime import timedelta

import torch
import torch.distributed as dist
from compressed_tensors.distributed import greedy_bin_packing, is_source_process

from quantlab.errors import DataError

log = logging.getLogger(__name__)

TIMEOUT = timedelta(minutes=30)  # a rank that died leaves the others waiting this long, then they fail
_local_only = False  # set by local_only(): ranks that run whole configurations on their own

__all__ = ["is_distributed", "rank", "world_size", "is_source_process", "init_from_env", "shutdown", "local_only",
           "batch_share", "PairwiseSum", "max_", "sum_int", "gather_rows", "spread", "broadcast_from", "gather_objects"]


def is_distributed() -> bool:
    return not _local_only and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> bool:
    """Join the torchrun job this process belongs to (nccl on CUDA, gloo on CPU); False when there is none."""
    if not launched_by_torchrun() or dist.is_initialized():
        return dist.is_initialized()
    if not dist.is_available():
        raise DataError("this torch build has no torch.distributed; run without torchrun")
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # "cuda" now means this rank's GPU
        backend = "nccl"
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    log.info("rank %d of %d joined (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def local_only() -> Iterator[None]:
    """Inside, this rank works alone (a sweep gives each rank whole configurations)."""
    global _local_only
    previous, _local_only = _local_only, True
    try:
        yield
    finally:
        _local_only = previous


# --- who calibrates on what -----------------------------------------------------------------------
def batch_share(n_batches: int) -> range:
    """This rank's contiguous run of batch indices: batches split as evenly as whole batches allow."""
    n, r = world_size(), rank()
    if n_batches < n:
        raise DataError(f"{n_batches} calibration batches cannot be shared by {n} ranks; "
                        f"use more --calib-samples or fewer ranks")
    return range(r * n_batches // n, (r + 1) * n_batches // n)


# --- exact reductions -----------------------------------------------------------------------------
def max_(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum over ranks (exact in any order), in place."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def sum_int(values: list[int], device: torch.device | str = "cpu") -> list[int]:
    """Integer sums over ranks (exact in any order)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.int64, device=_comm_device(device))
    dist.all_reduce(t)
    return t.tolist()


def _comm_device(device: torch.device | str) -> torch.device:
    """Where small bookkeeping tensors travel: the GPU under nccl (it cannot send CPU tensors)."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def all_ints(value: int) -> list[int]:
    """``value`` of every rank, in rank order."""
    if not is_distributed():
        return [value]
    mine = torch.tensor([value], dtype=torch.int64, device=_comm_device("cpu"))
    out = [torch.zeros_like(mine) for _ in range(world_size())]
    dist.all_gather(out, mine)
    return [int(t.item()) for t in out]


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along dim 0 in rank order (sizes may differ), on every rank."""
    if not is_distributed():
        return tensor
    sizes = all_ints(tensor.shape[0])
    padded = torch.zeros((max(sizes), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


class PairwiseSum:
    """Sum of per-leaf tuples of tensors along a fixed binary tree over global leaf positions.

    Leaf ``first_leaf + i`` is the i-th ``add``. Two nodes merge only when they are siblings in the
    tree (same height k, the left one starting at a multiple of 2^(k+1)), so the additions, and
    hence the rounding, depend only on the leaves, never on how they were split between ranks.
    At most 1 + log2(leaves) partial sums are held at once from leaf 0, about twice that from elsewhere.

        >>> s = PairwiseSum(0); _ = [s.add((torch.tensor([x], dtype=torch.float64),)) for x in (1., 2., 3.)]
        >>> s.total()[0].item()  # (1 + 2) + 3
        6.0
    """

    def __init__(self, first_leaf: int = 0) -> None:
        self.next_leaf = first_leaf
        self.nodes: list[tuple[int, int, tuple[torch.Tensor, ...]]] = []  # (first leaf, height, sums)

    def add(self, parts: tuple[torch.Tensor, ...]) -> None:
        self._push(self.next_leaf, 0, parts)
        self.next_leaf += 1

    def _push(self, start: int, height: int, parts: tuple[torch.Tensor, ...]) -> None:
        self.nodes.append((start, height, parts))
        while len(self.nodes) >= 2:
            (s0, h0, left), (s1, h1, right) = self.nodes[-2], self.nodes[-1]
            if h0 != h1 or s0 % (2 ** (h0 + 1)) != 0 or s1 != s0 + 2**h0:
                break
            self.nodes[-2:] = [(s0, h0 + 1, tuple(a.add_(b) for a, b in zip(left, right)))]

    def _fold(self) -> tuple[torch.Tensor, ...]:
        """The root: the last (partial) subtrees complete from the right, as an all-zero padding would."""
        *rest, (_, _, acc) = self.nodes
        for _, _, parts in reversed(rest):
            acc = tuple(a.add_(b) for a, b in zip(parts, acc))
        return acc

    def total(self) -> tuple[torch.Tensor, ...]:
        """The sum over every rank's leaves, the same on every rank (rank 0 completes the tree)."""
        if not self.nodes:
            raise DataError("nothing was added to a calibration sum; every rank needs at least one batch")
        if not is_distributed():
            return self._fold()
        if rank() == 0:
            for source in range(1, world_size()):
                for start, height, parts in self._receive(source, self.nodes[0][2]):
                    self._push(start, height, parts)
            result = self._fold()
        else:
            self._send()
            result = tuple(torch.empty_like(p) for p in self.nodes[0][2])
        for part in result:
            dist.broadcast(part, src=0)
        return result

    def _send(self) -> None:
        meta = torch.tensor([len(self.nodes)] + [v for s, h, _ in self.nodes for v in (s, h)], dtype=torch.int64,
                            device=_comm_device("cpu"))
        dist.send(torch.tensor([meta.numel()], dtype=torch.int64, device=meta.device), dst=0)
        dist.send(meta, dst=0)
        for _, _, parts in self.nodes:
            for part in parts:
                dist.send(part.contiguous(), dst=0)

    @staticmethod
    def _receive(source: int, like: tuple[torch.Tensor, ...]) -> Iterator[tuple[int, int, tuple[torch.Tensor, ...]]]:
        length = torch.zeros(1, dtype=torch.int64, device=_comm_device("cpu"))
        dist.recv(length, src=source)
        meta = torch.zeros(int(length.item()), dtype=torch.int64, device=length.device)
        dist.recv(meta, src=source)
        values = meta.tolist()
        for i in range(values[0]):
            parts = tuple(torch.empty_like(p) for p in like)
            for part in parts:
                dist.recv(part, src=source)
            yield values[1 + 2 * i], values[2 + 2 * i], parts


# --- spreading work over ranks --------------------------------------------------------------------
def spread(names: list[str], cost: Callable[[str], float]) -> dict[str, int]:
    """Name -> the rank that computes it: largest cost first, each to the least loaded rank."""
    _, _, owner = greedy_bin_packing(list(names), world_size(), cost)
    return owner


def _map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _map_tensors(getattr(obj, f.name), fn)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def broadcast_from(owner: int, obj, device: torch.device | None = None):
    """``obj`` as rank ``owner`` holds it, on every rank (tensors moved to ``device``, default CPU).

    Objects travel pickled between the ranks of this one job (never from a file); tensors go via
    the CPU so that a GPU tensor does not come back on the sender's device.
    """
    if not is_distributed():
        return obj
    box = [_map_tensors(obj, lambda t: t.detach().cpu()) if rank() == owner else None]
    dist.broadcast_object_list(box, src=owner, device=_comm_device("cpu"))
    return _map_tensors(box[0], lambda t: t.to(device or "cpu"))


def gather_objects(objs: list) -> list:
    """Every rank's list, concatenated in rank order, on rank 0 (others get [])."""
    if not is_distributed():
        return list(objs)
    box = [None] * world_size() if rank() == 0 else None
    dist.gather_object(objs, box, dst=0)
    return [item for part in box for item in part] if rank() == 0 else []
