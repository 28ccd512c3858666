"""GPTQ (Frantar et al., 2022): quantize a weight column by column, correcting the rest for each error.

For a linear with inputs X (tokens, in), GPTQ minimises ||XWᵀ - XŴᵀ||² one input column at a time:
after rounding column j it spreads the error over the columns not yet quantized, weighted by the
inverse Hessian H⁻¹ of that least-squares problem, H = 2XᵀX/n. Following the reference code:

- dead inputs (diag H = 0, a channel that is always zero) get H_jj = 1 and a zero weight;
- damping adds ``damp * mean(diag H)`` to the diagonal so the Cholesky factorisation is stable;
- columns are processed in lazy batches of ``block_size``: inside a batch the updates are rank-1,
  the later columns get the batch's accumulated error in one matmul (the same result, less traffic);
- the upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU) replaces H⁻¹: row j of U holds exactly the
  update coefficients for column j once columns < j are fixed.

Group scales: without act-order a group's scale is chosen (``primitives.choose_qparams``) when the
loop reaches its first column, from the columns as updated so far. We align lazy batches to whole
groups so that those columns include every update; the reference reads the not-yet-updated matrix
when a group starts inside a batch (g64 with batches of 128), a small difference. With
``static_groups`` all group scales come from the original weights before the loop.

Act-order (desc_act) quantizes columns by decreasing diag H, the most salient inputs first, while
the most freedom is left to compensate. The default (``GPTQParams``) is act-order with static groups,
llm-compressor's ``actorder="static"``; ``act_order=False`` is the paper's plain column order. Per-channel and per-tensor scales and static groups do not
depend on the order, so the result is returned in the original column order. Non-static groups are
formed *in the permuted order*, as the reference does: group k holds the permuted columns
k*g..(k+1)*g-1. The codes are then returned in permuted column order with ``perm`` (column j of the
codes is input feature ``perm[j]``); a GPTQ checkpoint's ``g_idx`` is ``argsort(perm) // g``.

When the Cholesky factorisation fails even with damping raised tenfold twice, the layer falls back
to round-to-nearest and says so (a warning, and ``fallback=True`` in the result).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from quantlab.calibrate import distributed
from quantlab.recipe import GPTQParams
from quantlab.numerics import kernels, microscaling
from quantlab.numerics.formats import Granularity, QuantFormat
from quantlab.numerics.primitives import QParams, Quantized, check_format_fits, choose_qparams, clipped_mask, fake_quantize, quantize

if TYPE_CHECKING:
    from quantlab.recipe import LayerResult
    from quantlab.calibrate.runner import BlockContext

log = logging.getLogger(__name__)

DAMP_RETRIES = 3  # damp, 10 x damp, 100 x damp, then give up and use RTN


@dataclass(frozen=True)
class GPTQResult:
    quantized: Quantized  # codes in original column order, or in ``perm`` order (act-order with groups)
    perm: torch.Tensor | None  # input feature of each stored column; None when stored in original order
    loss: float  # GPTQ's own objective: sum over columns of (w - q)² / (2 [H⁻¹]_jj²)
    damp: float  # the damping fraction that made the Cholesky work (0 when it fell back)
    fallback: bool  # True: Cholesky failed, the layer was quantized with RTN
    clipped_fraction: float  # share of (updated) weights clamped to the grid's ends


def inverse_from_cholesky(L: torch.Tensor) -> torch.Tensor:
    """H⁻¹ = L⁻ᵀ L⁻¹ from the lower Cholesky factor L of H: one triangular solve and one matmul.

    What ``torch.cholesky_inverse(L)`` returns (to fp32 rounding, ~1e-6 relative), but on CPU that
    routine ran ~10x the CPU time at n = 2048 (bench/bench_gptq_inverse.py). GPTQ itself no longer
    forms H⁻¹ (``upper_cholesky_of_inverse``); this stays as the benchmark's middle route.
    """
    eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
    L_inv = torch.linalg.solve_triangular(L, eye, upper=False)  # (in, in) lower
    return L_inv.t() @ L_inv


def upper_cholesky_of_inverse(H: torch.Tensor) -> tuple[torch.Tensor, int]:
    """U upper with UᵀU = H⁻¹, from one Cholesky factorisation and one triangular inverse; (U, info).

    The reference forms H⁻¹ and factorises it again (Cholesky, inverse, Cholesky: ~3.7 n³ flops on
    CPU). With J the order-reversing permutation, factor JHJ = KKᵀ (K lower); then H = RRᵀ with
    R = JKJ upper, H⁻¹ = R⁻ᵀR⁻¹, and by the uniqueness of a Cholesky factor with a positive
    diagonal U = R⁻¹ = J K⁻¹ J: one factorisation and one triangular inverse (at n = 4864 on 2 cores
    0.66 s against 1.05 s for the reference's three steps). At a 14336-wide down_proj that is most
    of GPTQ's time per block. ``info`` > 0: H is not positive definite.
    """
    K, info = torch.linalg.cholesky_ex(H.flip(0, 1))
    if info.item() != 0:
        return K, int(info.item())
    return lower_triangular_inverse(K).flip(0, 1), 0


def lower_triangular_inverse(K: torch.Tensor, leaf: int = 256) -> torch.Tensor:
    """K⁻¹ of a lower-triangular K by halves: [[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [-C⁻¹BA⁻¹, C⁻¹]].

    A triangular solve against the identity spends n³ flops in a routine that threads poorly on
    CPU; the halves put ~2n³/3 into matrix products (0.36 s against 0.57 s at n = 4864, 2 cores).
    """
    n = K.shape[0]
    if n <= leaf:
        return torch.linalg.solve_triangular(K, torch.eye(n, dtype=K.dtype, device=K.device), upper=False)
    h = n // 2
    A_inv, C_inv = lower_triangular_inverse(K[:h, :h], leaf), lower_triangular_inverse(K[h:, h:], leaf)
    inverse = torch.zeros_like(K)
    inverse[:h, :h], inverse[h:, h:] = A_inv, C_inv
    inverse[h:, :h] = -(C_inv @ (K[h:, :h] @ A_inv))
    return inverse


def _upper_cholesky_of_inverse(H: torch.Tensor, damp: float) -> tuple[torch.Tensor | None, float]:
    """U with H_damped⁻¹ = UᵀU, raising the damping tenfold on failure; (None, 0) if all tries fail."""
    mean_diag = torch.diag(H).mean().item()
    for attempt in range(DAMP_RETRIES):
        fraction = damp * 10**attempt
        damped = H.clone()
        damped.diagonal().add_(fraction * mean_diag)
        U, info = upper_cholesky_of_inverse(damped)
        if info == 0 and torch.isfinite(U).all():
            return U, fraction
        log.info("GPTQ: Cholesky failed with damp %.3g; retrying with more damping", fraction)
    return None, 0.0


def _column_format(fmt: QuantFormat) -> QuantFormat:
    """The same number format applied to one column with its group's (out or 1, 1, 1) scale.

    Scaled-block formats stay as they are: their columns are rounded elementwise with fixed scales.
    """
    return fmt if fmt.is_block_scaled else replace(fmt, granularity=Granularity("channel"))


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, fmt: QuantFormat, params: GPTQParams = GPTQParams(),
                  name: str = "this layer") -> GPTQResult:
    """GPTQ on one (out, in) weight with H (in, in); neither is modified. ``name`` is for the log."""
    check_format_fits(tuple(W.shape), fmt)
    W = W.detach().float().clone()  # (out, in)
    H = H.detach().float().clone()  # (in, in)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    grouped = fmt.granularity.kind == "group"
    # Scales that do not depend on the GPTQ updates: per-channel/-tensor, static groups, or a
    # scaled-block format (NVFP4's global scale and FP8 block's 128-row tiles see the whole weight).
    static = not grouped or params.static_groups or fmt.is_block_scaled
    fixed = choose_qparams(W, fmt) if static else None  # (rows, groups, 1)
    perm = torch.argsort(torch.diag(H), descending=True) if params.act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    U, damp = _upper_cholesky_of_inverse(H, params.damp)
    if U is None:
        log.warning("GPTQ: the Cholesky factorisation of H failed even with damping %.3g; %s is quantized "
                    "with RTN instead (check the calibration inputs for NaN/Inf, or raise --damp)",
                    params.damp * 10 ** (DAMP_RETRIES - 1), name)
        W = W[:, torch.argsort(perm)] if perm is not None else W
        qparams = choose_qparams(W, fmt)
        clipped = clipped_mask(W, fmt, qparams).float().mean().item()
        return GPTQResult(quantize(W, fmt, qparams), None, float("nan"), 0.0, True, clipped)
    rounded, losses, group_params = _gptq_loop(W, U, fmt, params, fixed, perm)
    return _finish(rounded, losses, fmt, fixed, group_params, perm, damp)


def _gptq_loop(W, U, fmt: QuantFormat, params: GPTQParams, fixed: QParams | None, perm):
    """The column loop on (permuted) W (out, in) with U (in, in). Returns rounded, losses, group params.

    The loop works on Wᵀ (in, out): a column of W is then a contiguous row, and the rank-1 update
    of the batch's later columns runs over contiguous memory (3.4x faster than over strided
    columns for a 4864 x 896 gate_proj). Column i of a lazy batch is updated by the earlier
    columns only (``T1[i+1:]`` below), so at the end of the batch ``T1`` holds exactly the values
    that were rounded, and the errors and losses of the batch come out in one vectorised step.
    """
    n_cols = W.shape[1]
    gran = fmt.granularity
    dynamic_groups = gran.kind == "group" and fixed is None
    # Lazy batches hold whole groups, so a group's scale always sees its columns fully updated.
    block_size = gran.group_size * max(1, params.block_size // gran.group_size) if gran.kind == "group" else params.block_size
    col_fmt = _column_format(fmt)
    T = W.t().contiguous()  # (in, out): row j is column j of W
    rounded = torch.zeros_like(T)  # W as updated when each column's turn came, transposed
    losses = torch.zeros_like(T)
    group_params: list[QParams] = []
    fixed_rounder = _FixedRounders(col_fmt, fixed, perm, gran) if fixed is not None else None
    for i1 in range(0, n_cols, block_size):
        i2 = min(i1 + block_size, n_cols)
        T1, U1 = T[i1:i2].clone(), U[i1:i2, i1:i2]  # (b, out), (b, b)
        Q1 = torch.empty_like(T1)
        # One intra-op thread for the per-column ops: they touch one column (a few thousand values),
        # where thread hand-offs cost more than the work (10x on a busy 2-core machine); the
        # batch's matmul below keeps every thread.
        with _one_thread():
            for i in range(i2 - i1):
                col = i1 + i
                if dynamic_groups and col % gran.group_size == 0:
                    group_params.append(choose_qparams(T1[i : i + gran.group_size].t(), col_fmt))
                    round_column = _column_rounder(col_fmt, group_params[-1])
                elif fixed_rounder is not None:
                    round_column = fixed_rounder.for_column(col)
                w = T1[i]
                Q1[i] = round_column(w)
                err = (w - Q1[i]) / U1[i, i]
                T1[i + 1 :].addr_(U1[i, i + 1 :], err, alpha=-1)  # rank-1 update of the batch's later columns
        Err1 = (T1 - Q1) / torch.diag(U1).unsqueeze(1)  # (b, out)
        rounded[i1:i2] = T1
        losses[i1:i2] = Err1.pow(2) / 2
        T[i2:] -= U[i1:i2, i2:].t() @ Err1  # the lazy update of every later column at once
    return rounded.t(), losses.t(), group_params


_THREADS_LOCK = threading.Lock()
_single_threaded = 0  # how many column loops run now; the thread count is restored when the last ends
_saved_threads = 1


@contextlib.contextmanager
def _one_thread():
    """torch's intra-op threads set to 1 while any column loop runs (the setting is process-wide)."""
    global _single_threaded, _saved_threads
    with _THREADS_LOCK:
        if _single_threaded == 0:
            _saved_threads = torch.get_num_threads()
            torch.set_num_threads(1)
        _single_threaded += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _single_threaded -= 1
            if _single_threaded == 0:
                torch.set_num_threads(_saved_threads)


def _column_rounder(col_fmt: QuantFormat, qp: QParams):
    """w (out,) -> its grid values with (out or 1, 1, 1) qparams ``qp``; integers take a short path.

    The loop runs once per input column, so the per-call overhead of the generic ``fake_quantize``
    (reshapes, checks) would dominate; the integer path calls the same kernel on flat vectors.
    """
    if col_fmt.is_block_scaled:
        scale = qp.working_scale().reshape(-1)  # (out,)
        return lambda w: microscaling.fake(w, scale, col_fmt)
    if col_fmt.kind != "int":
        return lambda w: fake_quantize(w.unsqueeze(1), col_fmt, qp).squeeze(1)
    scale = qp.scale.float().reshape(-1)  # (out,) or (1,)
    zero_point = None if qp.zero_point is None else qp.zero_point.reshape(-1)
    return lambda w: kernels.fake_int(w, scale, zero_point, col_fmt.qmin, col_fmt.qmax)


class _FixedRounders:
    """The rounder of each (permuted) column when the scales were fixed up front, one per group.

    With act-order and static groups consecutive columns belong to different groups, so building
    the group's qparams and rounder per column cost more than rounding it; they are built once.
    """

    def __init__(self, col_fmt: QuantFormat, fixed: QParams, perm, gran: Granularity) -> None:
        self.col_fmt, self.fixed, self.gran = col_fmt, fixed, gran
        self.perm = perm.tolist() if perm is not None else None
        self.by_group: dict[int, object] = {}

    def for_column(self, col: int):
        if self.gran.kind != "group":
            group = 0
        else:  # static groups: the group of the column's original position
            group = (self.perm[col] if self.perm is not None else col) // self.gran.group_size
        if group not in self.by_group:
            self.by_group[group] = _column_rounder(self.col_fmt, self._group_params(group))
        return self.by_group[group]

    def _group_params(self, group: int) -> QParams:
        """The (out or 1, 1, 1) qparams of one group (the whole tensor's or row's without groups)."""
        fixed = self.fixed
        if self.gran.kind != "group":
            return fixed
        pick = slice(group, group + 1)
        zero_point = None if fixed.zero_point is None else fixed.zero_point[:, pick]
        return QParams(fixed.scale[:, pick], zero_point, fixed.clip_ratio[:, pick], fixed.global_scale)


def _concat(group_params: list[QParams]) -> QParams:
    zero_point = None if group_params[0].zero_point is None else torch.cat([p.zero_point for p in group_params], dim=1)
    return QParams(torch.cat([p.scale for p in group_params], dim=1), zero_point,
                   torch.cat([p.clip_ratio for p in group_params], dim=1))


def _finish(rounded, losses, fmt, fixed, group_params, perm, damp: float) -> GPTQResult:
    """Codes of the rounded values with the scales that rounded them, so they dequantize exactly to Q."""
    qparams = fixed if fixed is not None else _concat(group_params)  # (rows, groups, 1)
    keep_permuted = perm is not None and fixed is None
    if perm is not None and not keep_permuted:
        rounded = rounded[:, torch.argsort(perm)]
    quantized = quantize(rounded, fmt, qparams)
    clipped = clipped_mask(rounded, fmt, qparams).float().mean().item()
    return GPTQResult(quantized, perm if keep_permuted else None, losses.sum().item(), damp, False, clipped)


def _solve_share(ctx: BlockContext, inputs: dict, owner: dict[str, int]) -> dict[str, tuple[GPTQResult, float]]:
    """GPTQ of the linears this rank owns: name -> (result, seconds)."""
    solved = {}
    for local_name, rank in owner.items():
        if rank == distributed.rank():
            start = time.perf_counter()
            result = gptq_quantize(ctx.weight(local_name), inputs[local_name].hessian, ctx.weight_format(local_name),
                                   ctx.config.gptq, name=ctx.linears[local_name].name)
            solved[local_name] = (result, time.perf_counter() - start)
    return solved


def process_block(ctx: BlockContext) -> list[LayerResult]:
    """GPTQ on every linear of the block, each with the H of its inputs in the full-precision block.

    Under torchrun the linears are spread over the ranks (largest out x in² first, the cost of the
    column loop) and each result is broadcast from the rank that computed it; every rank holds the
    same H, so the codes are those one process would compute.
    """
    inputs = ctx.collect(keep_inputs=ctx.keep_inputs)
    params = ctx.config.gptq
    names = list(ctx.linear_modules())
    owner = distributed.spread(names, lambda n: ctx.linears[n].out_features * ctx.linears[n].in_features ** 2)
    solved = _solve_share(ctx, inputs, owner)
    results = []
    for local_name in names:  # block order
        result, seconds = distributed.broadcast_from(owner[local_name], solved.get(local_name), ctx.weight(local_name).device)
        extra = {"gptq_loss": result.loss, "damp": result.damp, "fallback": result.fallback,
                 "act_order": params.act_order, "static_groups": params.static_groups, "block_size": params.block_size}
        results.append(ctx.finish_linear(
            local_name, result.quantized, inputs[local_name], seconds=seconds,
            clipped_fraction=result.clipped_fraction, extra=extra, in_perm=result.perm,
        ))
    return results
