"""Progress of a long run: what will run, time per block and the time left.

``BlockClock`` turns the runner's block fraction into "12.3 s/block, 4m10s left"; the first block
serves as the probe for the estimate (calibration costs about the same per block, so block 1's
time times the block count is the estimate the CLI and the app show once it is known).
"""

from __future__ import annotations

import time
from dataclasses import dataclass


def format_seconds(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``4000`` -> ``1h06m``: short enough for a progress line."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


@dataclass(frozen=True)
class RunPlan:
    """What a calibrated run will do, said before it starts."""

    config_name: str
    n_samples: int
    seq_len: int
    n_blocks: int
    n_linears: int
    device: str

    def __post_init__(self) -> None:
        if self.n_blocks < 1:
            raise ValueError(f"a run needs at least one block, got {self.n_blocks}")

    def describe(self) -> str:
        tokens = self.n_samples * self.seq_len
        return (f"{self.config_name}: {self.n_samples} x {self.seq_len} = {tokens:,} calibration tokens through "
                f"{self.n_blocks} blocks ({self.n_linears} linears) on {self.device}")


class BlockClock:
    """Per-block time and the time left, from the fraction of blocks done (``done / n_blocks``)."""

    def __init__(self, n_blocks: int, clock=time.perf_counter) -> None:
        self.n_blocks = n_blocks
        self.clock = clock
        self.started = clock()
        self.first_block_s: float | None = None  # the probe: block 1's time, once known

    def note(self, fraction: float) -> str:
        """``""`` before the first block is done, else ``", 12.3 s/block, 4m10s left"``."""
        done = round(fraction * self.n_blocks)
        if done < 1:
            return ""
        elapsed = self.clock() - self.started
        if self.first_block_s is None:
            self.first_block_s = elapsed / done
        per_block = elapsed / done
        return f", {per_block:.1f} s/block, {format_seconds(per_block * (self.n_blocks - done))} left"
