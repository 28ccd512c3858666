"""Standard errors of a perplexity and of a paired difference, from the losses of each evaluation window.

A perplexity is exp(mean NLL) over N scored tokens. Tokens of one window share their context, so they are not
independent draws; the windows (disjoint stretches of text) are. The standard error of the mean NLL is the
ratio estimator's over windows, with s_i the NLL summed over window i and n_i its scored tokens::

    m = sum(s_i) / sum(n_i)        SE(m)^2 = k / (k - 1) * sum((s_i - m n_i)^2) / sum(n_i)^2

(with equal n_i this is std(window means) / sqrt(k)). By the delta method SE(ppl) = ppl * SE(m).

Two runs scored on the same windows are compared *paired*, as llama.cpp's ``perplexity --kl-divergence``
reports its ± on ln(PPL(Q)/PPL(base)): the difference d_i = s_i(Q) - s_i(base) removes the variation of the
text itself, which dominates either run's own SE, so a 0.1 % difference can be far outside the noise when
both perplexities carry a 1 % standard error. Ratio: PPL(Q)/PPL(base) = exp(m_d), SE = exp(m_d) * SE(m_d).

Worked example: windows with NLL sums (10, 12) and (10.5, 12.1) over 4 tokens each give a difference of
(0.5 + 0.1) / 8 = 0.075 nats per token, SE sqrt(2 * ((0.5 - 0.3)^2 + (0.1 - 0.3)^2)) / 8 = 0.05.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from quantlab.errors import DataError

NOISE_SIGMAS = 2.0  # a difference within 2 standard errors (~95 %) is reported as within noise


@dataclass(frozen=True)
class MeanWithError:
    """A mean over windows and its standard error (NaN with fewer than two windows)."""

    mean: float
    se: float
    n_windows: int

    def __post_init__(self) -> None:
        if self.n_windows < 1:
            raise DataError("a mean needs at least one evaluation window")


def ratio_mean(sums: Sequence[float], counts: Sequence[int]) -> MeanWithError:
    """sum(sums) / sum(counts) and its standard error over the windows (see the module docstring)."""
    if len(sums) != len(counts) or not sums:
        raise DataError(f"{len(sums)} window losses for {len(counts)} window sizes; they must pair up")
    total = float(sum(counts))
    if total <= 0:
        raise DataError("the windows score no tokens")
    mean = math.fsum(sums) / total
    k = len(sums)
    if k < 2:
        return MeanWithError(mean, math.nan, k)
    spread = math.fsum((s - mean * n) ** 2 for s, n in zip(sums, counts))
    return MeanWithError(mean, math.sqrt(k / (k - 1) * spread) / total, k)


def paired_difference(sums: Sequence[float], baseline_sums: Sequence[float],
                      counts: Sequence[int]) -> MeanWithError:
    """Mean NLL difference per token (run - baseline) over the same windows, with its paired SE."""
    if len(sums) != len(baseline_sums):
        raise DataError(f"{len(sums)} windows against the baseline's {len(baseline_sums)}: a paired difference "
                        "needs both runs scored on the same windows (same text, eval tokens, context and stride)")
    return ratio_mean([a - b for a, b in zip(sums, baseline_sums)], counts)


def within_noise(difference: float, se: float, sigmas: float = NOISE_SIGMAS) -> bool | None:
    """True when |difference| < sigmas x SE; None when the SE is unknown."""
    if se is None or not math.isfinite(se):
        return None
    return abs(difference) < sigmas * se
