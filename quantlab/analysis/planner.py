"""Choose a format per linear under a size budget: an exact multiple-choice knapsack.

Each linear can be stored in one of a few candidate formats; each choice costs its exact bytes
(codes, scales, zero-points, as the Size accounting counts them) and is predicted to cost a loss
(the quality lost when only that linear is quantized so, measured: :mod:`quantlab.analysis.plan`).
The plan minimises the sum of the chosen losses with the bytes at most the budget. The sum assumes
the layers' losses add up, which holds to first order for small perturbations; the measured run
of the plan says how well.

Worked example: two layers of 1,000 bytes at 8 bits and 500 at 4 bits, with 4-bit losses 0.1 (A)
and 0.01 (B), under a 1,500-byte budget: one layer must drop to 4 bits, and B (the less sensitive)
does, for a predicted loss of 0.01.

    >>> a = LayerChoices("A", 1000, (LayerOption("int8", 1000, 0.0), LayerOption("int4", 500, 0.1)))
    >>> b = LayerChoices("B", 1000, (LayerOption("int8", 1000, 0.0), LayerOption("int4", 500, 0.01)))
    >>> [option.fmt_name for _, option in allocate([a, b], 1500).choices]
    ['int8', 'int4']

The knapsack is solved by dynamic programming over the budget cut into at most ``RESOLUTION``
units; each option's bytes are rounded *up* to whole units, so a plan never exceeds the budget,
and it is exactly optimal whenever the budget is under ``RESOLUTION`` bytes (or the costs are
multiples of the unit).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from quantlab.errors import FormatError

RESOLUTION = 20_000  # budget units of the dynamic programme: 28 MB of tables at most for a 7B model's 224 linears
MIN_BPW, MAX_BPW = 1.0, 32.0  # a budget outside these is a typo, not a plan


@dataclass(frozen=True)
class LayerOption:
    """One linear stored in one candidate format."""

    fmt_name: str
    n_bytes: int  # exact storage of the weight in this format: codes + scales + zero-points
    loss: float  # predicted quality loss when only this linear is in this format (may be ~0 or noise below 0)


@dataclass(frozen=True)
class LayerChoices:
    """A linear and its candidate formats."""

    name: str
    params: int
    options: tuple[LayerOption, ...]

    def __post_init__(self) -> None:
        if not self.options:
            raise FormatError(f"{self.name} has no candidate format that fits it; add a candidate that divides it")
        if any(not math.isfinite(o.loss) for o in self.options):
            raise FormatError(f"{self.name}: a candidate's measured loss is not finite; measure the sensitivity again")


@dataclass(frozen=True)
class Budget:
    """A size budget: bits per weight over the quantized linears, or MiB for the whole model."""

    bits_per_weight: float | None = None
    mib: float | None = None

    def __post_init__(self) -> None:
        given = [v for v in (self.bits_per_weight, self.mib) if v is not None]
        if len(given) != 1:
            raise FormatError("give one budget: bits per weight (e.g. 4.5) or MiB for the whole model")
        value = given[0]
        if not math.isfinite(value) or value <= 0:
            raise FormatError(f"the budget must be a positive number, got {value}")
        if self.bits_per_weight is not None and not MIN_BPW <= value <= MAX_BPW:
            raise FormatError(f"a budget of {value} bits per weight is outside {MIN_BPW:g}..{MAX_BPW:g}")

    @property
    def label(self) -> str:
        return f"{self.bits_per_weight:g}bpw" if self.bits_per_weight is not None else f"{self.mib:g}MiB"

    def quantized_bytes(self, quantized_params: int, kept_bytes: int) -> int:
        """The bytes the quantized linears may take: bpw x params / 8, or the MiB less the layers kept as they are."""
        if self.bits_per_weight is not None:
            return math.floor(self.bits_per_weight * quantized_params / 8)
        available = math.floor(self.mib * 2**20) - kept_bytes
        if available <= 0:
            raise FormatError(f"{self.mib:g} MiB is less than the layers kept in full precision alone "
                              f"({kept_bytes / 2**20:.3f} MiB: embeddings, norms, head); raise the budget")
        return available


@dataclass(frozen=True)
class Allocation:
    """The plan: one option per linear, in the order given."""

    choices: tuple[tuple[str, LayerOption], ...]
    budget_bytes: int
    params: int

    @property
    def n_bytes(self) -> int:
        return sum(option.n_bytes for _, option in self.choices)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.n_bytes / self.params

    @property
    def predicted_loss(self) -> float:
        return sum(option.loss for _, option in self.choices)


def allocate(layers: Sequence[LayerChoices], budget_bytes: int) -> Allocation:
    """The options of least summed loss whose bytes fit ``budget_bytes`` (see the module docstring)."""
    if not layers:
        raise FormatError("no linear layers to plan")
    smallest = sum(min(o.n_bytes for o in layer.options) for layer in layers)
    if smallest > budget_bytes:
        raise FormatError(f"the budget ({budget_bytes:,} bytes for the quantized linears) is below the smallest "
                          f"plan the candidates allow ({smallest:,} bytes, every linear in its smallest format); "
                          "raise the budget or add a smaller candidate")
    unit = max(1, math.ceil(budget_bytes / RESOLUTION))
    capacity = budget_bytes // unit
    best = np.zeros(capacity + 1)  # best[c]: least loss of the layers so far within c units
    picks = []
    for layer in layers:
        new = np.full(capacity + 1, np.inf)
        pick = np.full(capacity + 1, -1, dtype=np.int16)  # (capacity + 1,): the option chosen at each c
        for index, option in enumerate(layer.options):
            cost = math.ceil(option.n_bytes / unit)
            if cost > capacity:
                continue
            candidate = np.full(capacity + 1, np.inf)
            candidate[cost:] = best[: capacity + 1 - cost] + option.loss
            better = candidate < new
            new[better], pick[better] = candidate[better], index
        best = new
        picks.append(pick)
    if not np.isfinite(best[capacity]):  # rounding up to units made the tightest plan overflow
        raise FormatError(f"the budget ({budget_bytes:,} bytes) is too close to the smallest plan ({smallest:,}) "
                          "to resolve; raise it a little")
    return Allocation(_backtrack(layers, picks, capacity, unit), budget_bytes, sum(layer.params for layer in layers))


def _backtrack(layers, picks, capacity: int, unit: int) -> tuple[tuple[str, LayerOption], ...]:
    chosen, c = [], capacity
    for layer, pick in zip(reversed(layers), reversed(picks)):
        option = layer.options[int(pick[c])]
        chosen.append((layer.name, option))
        c -= math.ceil(option.n_bytes / unit)
    return tuple(reversed(chosen))
