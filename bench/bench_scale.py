"""QuantLab at the sizes users bring: Qwen2.5-0.5B, TinyLlama-1.1B and Llama-3-8B shapes, built locally.

Each shape's config lives in ``bench/shapes/NAME.json``; its checkpoint is built once under
``bench/.scale/NAME`` (gitignored): seeded random bf16 weights (speed and memory do not depend on
the values), written shard by shard as sharded safetensors with an index, plus the bundled LM's
tokenizer (its 4,096 ids are valid in every vocabulary). Then every command runs as its own
process, measured with ``os.wait4`` (peak RSS of that process alone):

    inspect, size         headers only
    eval                  --max-tokens 4096 --ctx 2048 (chunked LM head)
    quantize rtn / gptq   int4 g128, the CPU calibration defaults (16 x 512), --max-eval-tokens 512

and prints wall time, time per block (from the run's own "s/block" progress), peak RSS and RSS /
checkpoint bytes. With ``--peer-python`` (a venv with llm-compressor), llm-compressor's GPTQModifier
(W4A16, same calibration token ids, same device) runs beside QuantLab's GPTQ on each shape and the
per-block ratio is printed; without it, one skip line.

    nice -n 10 python bench/bench_scale.py --shapes qwen2.5-0.5b [--peer-python /work/peer-venv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = ROOT / "bench" / "shapes"
BUILD = ROOT / "bench" / ".scale"
SHARD_BYTES = 2 * 2**30
QUICK = ["--max-eval-tokens", "512"]


def shape_config(spec: str) -> tuple[str, dict]:
    """``NAME`` or ``NAME:Nb`` (the shape's widths and vocabulary with only its first N blocks: the
    time per block is the full model's, the run minutes instead of hours) -> folder name, config."""
    name, _, blocks = spec.partition(":")
    config = json.loads((SHAPES / f"{name}.json").read_text())
    if not blocks:
        return name, config
    n = int(blocks.removesuffix("b"))
    if not 1 <= n <= config["num_hidden_layers"]:
        raise SystemExit(f"bench_scale: {spec}: 1..{config['num_hidden_layers']} blocks")
    return f"{name}-{n}b", config | {"num_hidden_layers": n}


def build_shape(spec: str, seed: int = 0) -> Path:
    """The shape's checkpoint folder, built once: bf16 N(0, 0.02) matrices, unit norms, zero biases."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantlab.models.loading import resolve_source

    name, config_doc = shape_config(spec)
    folder = BUILD / name
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config_doc, indent=2))
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    weight_map, shard, shard_bytes, index = {}, {}, 0, 0

    def flush() -> None:
        nonlocal shard, shard_bytes, index
        if shard:
            index += 1
            filename = f"model-{index:05d}.safetensors"
            save_file(shard, folder / filename, metadata={"format": "pt"})
            weight_map.update({k: filename for k in shard})
            shard, shard_bytes = {}, 0

    for i, (key, shape) in enumerate(shapes.items()):
        generator = torch.Generator().manual_seed(seed * 100_003 + i)
        if key.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        elif key.endswith(".bias"):
            tensor = torch.zeros(shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        shard[key] = tensor
        shard_bytes += tensor.numel() * 2
        if shard_bytes >= SHARD_BYTES:
            flush()
    flush()
    n_files = index
    renamed = {}
    for old in sorted(set(weight_map.values())):  # transformers' names: model-00001-of-00003.safetensors
        new = old.replace(".safetensors", f"-of-{n_files:05d}.safetensors")
        (folder / old).rename(folder / new)
        renamed[old] = new
    total = sum((folder / f).stat().st_size for f in renamed.values())
    index_doc = {"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in weight_map.items()}}
    tokenizer_dir = Path(resolve_source(None))
    for name_ in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name_, folder / name_)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=1))  # last: marks it complete
    return folder


def checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def measured(argv: list[str], log_path: Path, keep_stdout: bool = False) -> dict:
    """Run ``argv``; wall seconds, peak RSS (this process alone), exit code, its stderr (and with
    ``keep_stdout`` its stdout) kept in a log."""
    started = time.perf_counter()
    with log_path.open("w") as log:
        process = subprocess.Popen(argv, stdout=log if keep_stdout else subprocess.DEVNULL, stderr=log, cwd=ROOT,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
        _, status, usage = os.wait4(process.pid, 0)
    stderr = log_path.read_text()
    return {"wall_s": time.perf_counter() - started, "peak_rss": usage.ru_maxrss * 1024,
            "rc": os.waitstatus_to_exitcode(status), "stderr": stderr}


def per_block(stderr: str) -> float | None:
    """Seconds per block after the first: the run reports the mean over the k blocks done (m_k), so
    block k took k m_k - (k-1) m_(k-1). The first block is left out (it holds one-off costs such as
    compiling the fused kernels, as the peer's tracing falls before its first block); with one
    block, its time."""
    means = [float(m) for m in re.findall(r"([0-9.]+) s/block", stderr)]
    if len(means) < 2:
        return means[-1] if means else None
    return (len(means) * means[-1] - means[0]) / (len(means) - 1)


def quantlab_commands(folder: Path) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "quantlab"]
    return {
        "inspect": [*cli, "inspect", str(folder)],
        "size": [*cli, "size", str(folder), "--format", "int4", "--group-size", "128"],
        "eval": [*cli, "eval", str(folder), "--max-tokens", "4096", "--ctx", "2048"],
        "rtn int4 g128": [*cli, "quantize", str(folder), "--method", "rtn", "--group-size", "128", *QUICK],
        "gptq int4 g128": [*cli, "quantize", str(folder), "--method", "gptq", "--group-size", "128", *QUICK],
    }


def dump_calibration(folder: Path | str) -> Path:
    """The calibration ids QuantLab's GPTQ draws by default on this machine, for the peer to use too."""
    import torch

    from quantlab.calibrate.runner import calibration_set
    from quantlab.models.loading import _load_tokenizer
    from quantlab.recipe import CPU_LARGE_CALIB, CalibConfig

    folder = Path(folder)
    n_samples, seq_len = CPU_LARGE_CALIB
    ids = calibration_set(_load_tokenizer(str(folder), True), CalibConfig(n_samples=n_samples, seq_len=seq_len))
    path = folder / "calib_ids.pt"
    torch.save(ids.contiguous(), path)
    return path


def row(shape: str, command: str, result: dict, ckpt: int) -> str:
    block = result.get("per_block_s")
    block_text = f"{block:8.1f}" if block is not None else f"{'-':>8}"
    status = "" if result["rc"] == 0 else f"  (exit {result['rc']}: {result['stderr'].strip().splitlines()[-1][:80]})"
    return (f"{shape:<15} {command:<22} {result['wall_s']:9.1f} {block_text} {result['peak_rss'] / 2**30:9.2f} "
            f"{result['peak_rss'] / ckpt:8.2f}{status}")


def in_child(function: str, name: str) -> Path:
    """Build or dump in a child process: this one stays small, so that the measured children, forked
    from it, do not start with its memory counted in their peak RSS."""
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import bench_scale as b; print(b.{function}({name!r}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise SystemExit(f"bench_scale: {function}({name}) failed: {done.stderr.strip().splitlines()[-1:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def run_shape(spec: str, peer_python: str | None, commands: list[str], out: Path, rounds: int) -> list[dict]:
    name, config_doc = shape_config(spec)
    folder = in_child("build_shape", spec)
    ckpt = checkpoint_bytes(folder)
    n_blocks = config_doc["num_hidden_layers"]
    print(f"# {name}: {ckpt / 2**30:.2f} GiB bf16 in {len(list(folder.glob('*.safetensors')))} shards, "
          f"{n_blocks} blocks", flush=True)
    results = []
    for command, argv in quantlab_commands(folder).items():
        if command not in commands or command == "gptq int4 g128":
            continue
        results.append(run_quantlab(name, command, argv, ckpt, out))
    if "gptq int4 g128" in commands:
        results += run_gptq_rounds(name, folder, peer_python, ckpt, out, rounds)
    return results


def run_quantlab(name: str, command: str, argv: list[str], ckpt: int, out: Path, tag: str = "") -> dict:
    result = measured(argv, out / f"{name}-{command.replace(' ', '_')}{tag}.log")
    result["per_block_s"] = per_block(result["stderr"])
    print(row(name, command, result, ckpt), flush=True)
    return {"shape": name, "command": command, "checkpoint_bytes": ckpt} | {k: v for k, v in result.items()
                                                                             if k != "stderr"}


def run_gptq_rounds(name: str, folder: Path, peer_python: str | None, ckpt: int, out: Path,
                    rounds: int) -> list[dict]:
    """QuantLab's GPTQ and llm-compressor's, interleaved round by round on the same token ids, so
    that a change in the machine's load falls on both; the ratio of each round and their median."""
    argv = quantlab_commands(folder)["gptq int4 g128"]
    peer = peer_python if peer_python and Path(peer_python).is_file() else None
    if peer is None:
        print(f"{name:<15} llm-compressor gptq    skipped: no --peer-python with llm-compressor given", flush=True)
        return [run_quantlab(name, "gptq int4 g128", argv, ckpt, out)]
    ids = in_child("dump_calibration", str(folder))
    results, ratios = [], []
    for round_ in range(1, rounds + 1):
        ours = run_quantlab(name, "gptq int4 g128", argv, ckpt, out, tag=f"-round{round_}")
        theirs = run_peer(name, folder, peer, ids, ckpt, out, round_)
        results += [ours, theirs]
        if ours["per_block_s"] and theirs["per_block_s"]:
            ratios.append(ours["per_block_s"] / theirs["per_block_s"])
            print(f"{name:<15} round {round_}: gptq s/block QuantLab / llm-compressor = {ratios[-1]:.2f}", flush=True)
    if ratios:
        print(f"{name:<15} gptq s/block QuantLab / llm-compressor: median {statistics.median(ratios):.2f} "
              f"over {len(ratios)} rounds ({', '.join(f'{r:.2f}' for r in ratios)})", flush=True)
    return results


def peer_per_block(stderr: str) -> float | None:
    """The peer's seconds per block: from the first block's start to the last's, over the blocks between
    (its one-off set-up, tracing and dataset preparation before block 0 are left out, as QuantLab's
    "s/block" leaves out loading)."""
    starts = [float(s) for s in re.findall(r"block_start \d+ ([0-9.]+)", stderr)]
    if len(starts) >= 2:
        return (starts[-1] - starts[0]) / (len(starts) - 1)
    return None


def run_peer(name: str, folder: Path, peer_python: str, ids: Path, ckpt: int, out: Path, round_: int) -> dict:
    argv = [peer_python, str(ROOT / "bench" / "peer_gptq.py"), str(folder), str(ids)]
    result = measured(argv, out / f"{name}-peer_gptq-round{round_}.log")
    result["per_block_s"] = peer_per_block(result["stderr"])
    print(row(name, "llm-compressor gptq", result, ckpt), flush=True)
    return {"shape": name, "command": "llm-compressor gptq", "checkpoint_bytes": ckpt} | {
        k: v for k, v in result.items() if k != "stderr"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="qwen2.5-0.5b", help="comma-separated names in bench/shapes")
    parser.add_argument("--commands", default="inspect,size,eval,rtn int4 g128,gptq int4 g128")
    parser.add_argument("--peer-python", default=None, help="python of a venv with llm-compressor")
    parser.add_argument("--out", default=str(BUILD / "results"), help="folder for logs and results.json")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved QuantLab / llm-compressor GPTQ rounds")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commands = [c.strip() for c in args.commands.split(",")]
    print(f"{'shape':<15} {'command':<22} {'wall s':>9} {'s/block':>8} {'peak GiB':>9} {'RSS/ckpt':>8}", flush=True)
    results = []
    for name in args.shapes.split(","):
        results += run_shape(name.strip(), args.peer_python, commands, out, args.rounds)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    assert all(math.isfinite(r["wall_s"]) for r in results)


if __name__ == "__main__":
    main()
