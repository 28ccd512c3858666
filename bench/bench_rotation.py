"""Does Hadamard rotation help INT4 per-channel, INT4 g128 and W4A8 on the bundled LM and on MiniLM?

Runs each configuration several ways through the Quality page's own path (``run_sweep``), same
calibration and held-out text, and prints the headline metric side by side. The bundled LM:
plain, ``rot1-`` (the residual stream rotated, fused), ``rot4-`` (the online Hadamard before every
down_proj alone) and ``rot-`` (both, as QuaRot): perplexity. MiniLM (``--model encoder``), post-norm,
where only the down-projection's input can be rotated: plain and ``rot4-``: embedding fidelity
(mean cosine to full precision). Usage:

    python bench/bench_rotation.py [--model encoder] [--configs int4-per-channel,w4a8,int4-g128]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from quantlab.models.loading import BUNDLED_ENCODER, load_model  # noqa: E402
from quantlab.runs.pipeline import run_sweep, sweep_configs

WAYS = {"lm": (("plain", ""), ("residual", "rot1-"), ("down", "rot4-"), ("residual+down", "rot-")),
        "encoder": (("plain", ""), ("down", "rot4-"))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=sorted(WAYS), default="lm")
    parser.add_argument("--configs", default="int4-per-channel,rtn-int4-per-channel-a8,int4-g128,w4a8")
    args = parser.parse_args()
    loaded = load_model(BUNDLED_ENCODER) if args.model == "encoder" else load_model()
    ways, bases = WAYS[args.model], args.configs.split(",")
    names = ["fp"] + [prefix + base for base in bases for _, prefix in ways]
    configs = sweep_configs(names)
    results = run_sweep(loaded, configs)
    metric = "fidelity" if args.model == "encoder" else "perplexity"
    value = {name: result.quality.get(metric) for name, result in zip(names, results)}
    print(f"{loaded.name}, {metric}; full precision: {value['fp']:.4f}")
    print(f"{'config':<28}" + "".join(f"{label:>16}" for label, _ in ways))
    for base, config in zip(bases, configs[1::len(ways)]):
        print(f"{config.name:<28}" + "".join(f"{value[prefix + base]:16.4f}" for _, prefix in ways))


if __name__ == "__main__":
    main()
