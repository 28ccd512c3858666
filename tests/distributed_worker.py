"""Quantize the bundled LM with several methods and save every code and scale (a helper of test_distributed).

Run plainly (one process) or under ``torchrun --nproc_per_node N``: the calibration is then shared
by the ranks, and rank 0 saves. Usage: ``python tests/distributed_worker.py OUT.pt [CONFIG ...]``.
"""

from __future__ import annotations

import sys

import torch

from quantlab.calibrate import distributed
from quantlab.calibrate.runner import calibration_set, run_blocks
from quantlab.models.loading import load_model
from quantlab.models.quantized import QuantizedLinear
from quantlab.recipe import CalibConfig, parse_config_name
from quantlab.runs.pipeline import _processor

CALIB = CalibConfig(n_samples=8, seq_len=64)  # 8 windows in batches of 2: 4 batches, 2 per rank
BUFFERS = ("codes", "scale", "zero_point", "input_scale", "in_perm")


def quantized_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every QuantizedLinear's codes, scales, zero-points, input scales and permutations, plus static act scales."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            for buffer in BUFFERS:
                value = getattr(module, buffer)
                if value is not None:
                    state[f"{name}.{buffer}"] = value.detach().cpu().clone()
            quantizer = module.act_quantizer
            if quantizer is not None and quantizer.static_scale is not None:
                state[f"{name}.act_scale"] = torch.tensor(quantizer.static_scale, dtype=torch.float64)
    return state


def main(out: str, names: list[str]) -> None:
    distributed.init_from_env()
    loaded = load_model()
    calib_ids = calibration_set(loaded.tokenizer, CALIB)
    saved = {"world_size": distributed.world_size()}
    for name in names:
        config = parse_config_name(name, calib=CALIB)
        run = run_blocks(loaded.model, calib_ids, _processor(config.method), config, structure=loaded.structure,
                         batch_size=2)
        saved[name] = {"state": quantized_state(run.model),
                       "errors": [(r.name, r.output_error, r.weight_error, r.clipped_fraction) for r in run.layers],
                       "searches": repr(run.searches)}
    if distributed.is_source_process():
        torch.save(saved, out)
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
