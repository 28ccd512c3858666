"""The scaled-block formats explained with numbers: E2M1's codes, one block worked through MXFP4 and
NVFP4, and how well a power-of-two scale fits each block of a layer (clipped or wasted range)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from quantlab.errors import FormatError
from quantlab.numerics.formats import QuantFormat
from quantlab.numerics.minifloats import BLOCK_SPECS, E2M1, element_codes, mx_exponent
from quantlab.numerics.primitives import choose_qparams, fake_quantize, to_blocks


def e2m1_table() -> pd.DataFrame:
    """The 16 FP4 (E2M1) codes: bit pattern, sign, exponent and mantissa fields, value."""
    values = torch.tensor(E2M1.grid())
    codes = element_codes(values, E2M1).tolist()
    rows = [{"bits": f"{c:04b}", "sign": c >> 3, "exponent": (c >> 1) & 3, "mantissa": c & 1, "value": float(v)}
            for c, v in zip(codes, values.tolist())]
    rows.append({"bits": "1000", "sign": 1, "exponent": 0, "mantissa": 0, "value": -0.0})  # negative zero
    return pd.DataFrame(rows).sort_values("bits").reset_index(drop=True)


def worked_block(values: Sequence[float], kinds: Sequence[str] = ("mxfp4", "nvfp4")) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One block of values through each format: (per value table, per format summary).

    The vector is padded with zeros to the format's block (32 for MXFP4, 16 for NVFP4) when shorter,
    and only its first block is used when longer.
    """
    x = torch.tensor([float(v) for v in values], dtype=torch.float32)
    if x.numel() == 0 or not torch.isfinite(x).all():
        raise FormatError("give at least one finite value")
    table = pd.DataFrame({"value": x.numpy()})
    summary = []
    for kind in kinds:
        fmt = QuantFormat.parse(kind)
        block = torch.zeros(fmt.granularity.group_size)
        n = min(x.numel(), block.numel())
        block[:n] = x[:n]
        qparams = choose_qparams(block, fmt)
        working = float(qparams.working_scale().reshape(-1)[0])
        x_hat = fake_quantize(block, fmt, qparams)[:n]
        full = torch.full((x.numel(),), float("nan"))
        full[:n] = x_hat
        table[f"{kind} x/s"] = (x / working).numpy()
        table[f"{kind} value"] = full.numpy()
        element = BLOCK_SPECS[kind].element
        absmax = block.abs().max()
        summary.append({
            "format": kind, "block": fmt.granularity.group_size, "absmax": float(absmax),
            "stored scale": float(qparams.scale.float().reshape(-1)[0]),
            "global scale": None if qparams.global_scale is None else float(qparams.global_scale),
            "working scale s": working, "grid top (s x 6)": working * element.max,
            "absmax / grid top": float(absmax) / (working * element.max),
            "mse": float((x_hat - x[:n]).pow(2).mean()),
            "bits per weight": fmt.bits_per_weight(fmt.granularity.group_size * 64, 4096),
        })
    return table, pd.DataFrame(summary)


def mx_rounding_table(absmaxes: Sequence[float] = (1.0, 1.5, 1.7, 1.75, 1.8, 2.0, 3.3)) -> pd.DataFrame:
    """E8M0 scale choice for MXFP4 blocks with these absmaxes: the power of two, k, and the fit."""
    absmax = torch.tensor(absmaxes, dtype=torch.float32)
    k = mx_exponent(absmax, E2M1)
    scale = torch.pow(2.0, k.float())
    return pd.DataFrame({"absmax": absmax.numpy(), "k": k.numpy(), "scale 2^k": scale.numpy(),
                         "absmax / s": (absmax / scale).numpy(),
                         "top value kept": torch.clamp(absmax / scale, max=E2M1.max).mul(scale).numpy()})


def scale_fit(W: torch.Tensor, fmt: QuantFormat) -> pd.DataFrame:
    """Per block of ``W``: absmax / (working scale x element max), the share of its range the grid covers.

    Above 1 the block's largest values clip to the top code; below 1 the top codes go unused (range
    wasted). NVFP4's fp8 scale keeps it near 1; MXFP4's power-of-two scale spreads it over
    [0.58, 1.17): absmax = f * 2^e with f in [1, 1.75) gives f / 1.5, with f in [1.75, 2) gives f / 3.
    """
    if not fmt.is_block_scaled:
        raise FormatError(f"{fmt.name} is not a scaled-block format; pick mxfp4, nvfp4, ... in the sidebar")
    Wf = W.detach().float()
    blocks = to_blocks(Wf, fmt)  # (rows, groups, g)
    qparams = choose_qparams(Wf, fmt)
    absmax = blocks.abs().amax(dim=-1, keepdim=True)
    top = qparams.working_scale() * BLOCK_SPECS[fmt.kind].element.max
    ratio = (absmax / top).reshape(-1)
    return pd.DataFrame({"fit": ratio.numpy(), "absmax": absmax.reshape(-1).numpy()})


def scale_fit_summary(fits: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Share of blocks that clip (fit > 1) and the mean share of the grid's range used, per format."""
    rows = []
    for name, fit in fits.items():
        used = np.minimum(fit["fit"].to_numpy(), 1.0)
        rows.append({"format": name, "blocks": len(fit), "blocks clipping": float((fit["fit"] > 1.0).mean()),
                     "mean range used": float(used.mean()), "worst overshoot": float(fit["fit"].max())})
    return pd.DataFrame(rows)
