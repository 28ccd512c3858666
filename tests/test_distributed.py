"""torchrun with 2 ranks (gloo, CPU) gives the very codes and scales of one process, bit for bit.

The runs are real: the bundled LM quantized with RTN, GPTQ, AWQ and SmoothQuant with static
activation scales, once in a plain process and once under ``torchrun --nproc_per_node 2``, both
with one thread per process (LAPACK's Cholesky, used by GPTQ, rounds differently with more).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from quantlab.calibrate import distributed

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed_worker.py"
CONFIGS = ("rtn-int4-g128", "gptq-int4-g128", "awq-int4-g128", "smoothquant-int8-a8-static")

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this torch build has no torch.distributed with the gloo backend")


def _env() -> dict:
    return os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def _start(out: Path, ranks: int) -> subprocess.Popen:
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={ranks}"]
    return subprocess.Popen([*launcher, str(WORKER), str(out), *CONFIGS], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]


@needs_gloo
def test_two_ranks_give_the_codes_scales_and_errors_of_one_process(tmp_path):
    one, two = _start(tmp_path / "one.pt", 1), _start(tmp_path / "two.pt", 2)  # side by side: 3 processes
    _finish(one)
    _finish(two)
    single, shared = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert (single["world_size"], shared["world_size"]) == (1, 2)
    for name in CONFIGS:
        a, b = single[name]["state"], shared[name]["state"]
        assert a.keys() == b.keys() and len(a) >= 28, name  # 4 blocks x 7 linears, codes and scales at least
        differ = [key for key in a if a[key].dtype != b[key].dtype or not torch.equal(a[key], b[key])]
        assert not differ, f"{name}: {differ[:5]}"
        assert single[name]["errors"] == shared[name]["errors"], name  # per-layer errors from the all-reduced H
        assert single[name]["searches"] == shared[name]["searches"], name  # AWQ alphas and losses, smoothing scales


def test_pairwise_sum_does_not_depend_on_how_the_leaves_are_split():
    """The same fixed tree whether one holder adds all leaves or three holders add runs of them."""
    torch.manual_seed(0)
    leaves = [torch.randn(5, dtype=torch.float64) * 10 ** torch.randint(-8, 8, (5,)) for _ in range(11)]
    whole = distributed.PairwiseSum(0)
    for leaf in leaves:
        whole.add((leaf.clone(),))
    expected = whole.total()[0]
    merged = distributed.PairwiseSum(0)
    for start, stop in ((0, 3), (3, 4), (4, 11)):  # what rank 0 does with the nodes the other ranks send
        part = distributed.PairwiseSum(start)
        for leaf in leaves[start:stop]:
            part.add((leaf.clone(),))
        for node in part.nodes:
            merged._push(*node)
    assert torch.equal(merged._fold()[0], expected)
    sequential = sum(leaves[1:], leaves[0].clone())
    assert torch.allclose(expected, sequential, rtol=1e-12)  # the same sum, grouped differently


def test_outside_torchrun_the_helpers_are_no_ops():
    assert not distributed.is_distributed() and distributed.world_size() == 1 and distributed.rank() == 0
    assert distributed.batch_share(5) == range(5)
    x = torch.arange(6.0).reshape(3, 2)
    assert distributed.gather_rows(x) is x and distributed.max_(x) is x
    assert distributed.broadcast_from(1, {"a": x})["a"] is x
    assert distributed.gather_objects([1, 2]) == [1, 2]


def test_a_sweep_gives_each_rank_whole_configurations_longest_first(monkeypatch):
    from quantlab.runs.pipeline import METHOD_COST, sweep_configs, sweep_share

    configs = sweep_configs()  # the default sweep: fp, six RTN, GPTQ, AWQ, SmoothQuant, KV
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    shares = []
    for r in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        shares.append(sweep_share(configs))
    assert sorted(shares[0] + shares[1]) == list(range(len(configs)))  # every configuration exactly once
    methods = [{configs[i].method for i in share} for share in shares]
    assert "awq" in methods[0] and "gptq" in methods[1]  # the two longest start on different ranks
    loads = [sum(METHOD_COST[configs[i].method] for i in share) for share in shares]
    assert abs(loads[0] - loads[1]) <= max(METHOD_COST.values())  # greedy: within one configuration
