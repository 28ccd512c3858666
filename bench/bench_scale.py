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


def build_shape(name: str, seed: int = 0) -> Path:
    """The shape's checkpoint folder, built once: bf16 N(0, 0.02) matrices, unit norms, zero biases."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantlab.models.loading import resolve_source

    folder = BUILD / name
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text((SHAPES / f"{name}.json").read_text())
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


def measured(argv: list[str], log_path: Path) -> dict:
    """Run ``argv``; wall seconds, peak RSS (this process alone), exit code, its stderr kept in a log."""
    started = time.perf_counter()
    with log_path.open("w") as log:
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
        _, status, usage = os.wait4(process.pid, 0)
    stderr = log_path.read_text()
    return {"wall_s": time.perf_counter() - started, "peak_rss": usage.ru_maxrss * 1024,
            "rc": os.waitstatus_to_exitcode(status), "stderr": stderr}


def per_block(stderr: str) -> float | None:
    """The last "N s/block" the run reported (its mean over the blocks done)."""
    found = re.findall(r"([0-9.]+) s/block", stderr)
    return float(found[-1]) if found else None


def quantlab_commands(folder: Path) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "quantlab"]
    return {
        "inspect": [*cli, "inspect", str(folder)],
        "size": [*cli, "size", str(folder), "--format", "int4", "--group-size", "128"],
        "eval": [*cli, "eval", str(folder), "--max-tokens", "4096", "--ctx", "2048"],
        "rtn int4 g128": [*cli, "quantize", str(folder), "--method", "rtn", "--group-size", "128", *QUICK],
        "gptq int4 g128": [*cli, "quantize", str(folder), "--method", "gptq", "--group-size", "128", *QUICK],
    }


def dump_calibration(folder: Path) -> Path:
    """The calibration ids QuantLab's GPTQ draws by default on this machine, for the peer to use too."""
    import torch

    from quantlab.calibrate.runner import calibration_set
    from quantlab.models.loading import _load_tokenizer
    from quantlab.recipe import CPU_LARGE_CALIB, CalibConfig

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
    argument = f"b.BUILD / {name!r}" if function == "dump_calibration" else repr(name)
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import bench_scale as b; print(b.{function}({argument}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise SystemExit(f"bench_scale: {function}({name}) failed: {done.stderr.strip().splitlines()[-1:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def run_shape(name: str, peer_python: str | None, commands: list[str], out: Path) -> list[dict]:
    folder = in_child("build_shape", name)
    ckpt = checkpoint_bytes(folder)
    n_blocks = json.loads((SHAPES / f"{name}.json").read_text())["num_hidden_layers"]
    print(f"# {name}: {ckpt / 2**30:.2f} GiB bf16 in {len(list(folder.glob('*.safetensors')))} shards, "
          f"{n_blocks} blocks", flush=True)
    results = []
    for command, argv in quantlab_commands(folder).items():
        if command not in commands:
            continue
        result = measured(argv, out / f"{name}-{command.replace(' ', '_')}.log")
        result["per_block_s"] = per_block(result["stderr"])
        print(row(name, command, result, ckpt), flush=True)
        results.append({"shape": name, "command": command, "checkpoint_bytes": ckpt}
                       | {k: v for k, v in result.items() if k != "stderr"})
    if "gptq int4 g128" in commands:
        results += run_peer(name, folder, peer_python, n_blocks, ckpt, out, results)
    return results


def run_peer(name: str, folder: Path, peer_python: str | None, n_blocks: int, ckpt: int, out: Path,
             results: list[dict]) -> list[dict]:
    if not peer_python or not Path(peer_python).is_file():
        print(f"{name:<15} llm-compressor gptq    skipped: no --peer-python with llm-compressor given", flush=True)
        return []
    ids = in_child("dump_calibration", name)
    argv = [peer_python, str(ROOT / "bench" / "peer_gptq.py"), str(folder), str(ids)]
    result = measured(argv, out / f"{name}-peer_gptq.log")
    seconds = re.findall(r"oneshot_s ([0-9.]+)", result["stderr"])
    result["per_block_s"] = float(seconds[-1]) / n_blocks if seconds else None
    print(row(name, "llm-compressor gptq", result, ckpt), flush=True)
    ours = next((r["per_block_s"] for r in results if r["command"] == "gptq int4 g128"), None)
    if ours and result["per_block_s"]:
        print(f"{name:<15} gptq s/block QuantLab / llm-compressor = {ours / result['per_block_s']:.2f}", flush=True)
    return [{"shape": name, "command": "llm-compressor gptq", "checkpoint_bytes": ckpt}
            | {k: v for k, v in result.items() if k != "stderr"}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="qwen2.5-0.5b", help="comma-separated names in bench/shapes")
    parser.add_argument("--commands", default="inspect,size,eval,rtn int4 g128,gptq int4 g128")
    parser.add_argument("--peer-python", default=None, help="python of a venv with llm-compressor")
    parser.add_argument("--out", default=str(BUILD / "results"), help="folder for logs and results.json")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commands = [c.strip() for c in args.commands.split(",")]
    print(f"{'shape':<15} {'command':<22} {'wall s':>9} {'s/block':>8} {'peak GiB':>9} {'RSS/ckpt':>8}", flush=True)
    results = []
    for name in args.shapes.split(","):
        results += run_shape(name.strip(), args.peer_python, commands, out)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    assert all(math.isfinite(r["wall_s"]) for r in results)


if __name__ == "__main__":
    main()
