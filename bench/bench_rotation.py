"""Does a fused Hadamard rotation of the residual stream help INT4 per-channel and W4A8 on the bundled LM?

Runs the same configurations on the bundled LM and on its rotated copy (quantlab.algorithms.rotation),
same calibration and held-out text, and prints perplexity side by side. Usage:

    python bench/bench_rotation.py [--configs int4-per-channel,w4a8,int4-g128]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from quantlab.algorithms.rotation import rotate_model  # noqa: E402
from quantlab.models.loading import load_model
from quantlab.runs.pipeline import run_sweep, sweep_configs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", default="fp,int4-per-channel,rtn-int4-per-channel-a8,int4-g128,w4a8")
    args = parser.parse_args()
    loaded = load_model()
    rotated = replace(loaded, model=rotate_model(loaded.model), name=f"{loaded.name} (rotated)")
    names = args.configs.split(",")
    rows = {}
    for label, model in (("plain", loaded), ("rotated", rotated)):
        for result in run_sweep(model, sweep_configs(names)):
            rows.setdefault(result.config.name, {})[label] = result.quality.get("perplexity")
    print(f"{'config':<28} {'plain ppl':>10} {'rotated ppl':>12}")
    for name, row in rows.items():
        print(f"{name:<28} {row['plain']:10.4f} {row['rotated']:12.4f}")


if __name__ == "__main__":
    main()
