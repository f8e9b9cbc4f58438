"""Worker for test_layouts' overlap checks (torchrun, 2 processes: DP2 with the distributed
optimizer and the GPU path's communication overlap, so the full parameters are all-gathered in
the next forward, not in the optimizer step).

Trains two steps, saves, and loads the checkpoint into a second model built without overlap.
Prints, as JSON on rank 0's last line: the largest difference between the saved-and-loaded
parameters and the trained ones (gathered), and the losses of one more step on each model.
"""
import json
import sys

import numpy as np
import torch
import torch.distributed as dist

from engine.checkpoint import load_checkpoint, save_checkpoint
from engine.model.config import get_model_config
from engine.model.kernel_choices import KernelChoices
from engine.parallel.layout import ParallelLayout
from engine.parallel.param_sync import parameters_current
from engine.parallel.setup import destroy_parallel, initialize_parallel
from engine.training.build import build_training_state
from engine.training.data import build_micro_batch
from engine.training.run_plan import RunPlan
from engine.training.step import train_step


def _parameters(chunks) -> dict[str, torch.Tensor]:
    with parameters_current(chunks):
        return {name: param.detach().clone() for name, param in
                chunks[0].module.named_parameters()}


def main() -> None:
    root = sys.argv[1]
    layout = ParallelLayout.for_world_size(2, distributed_optimizer=True)
    plan = RunPlan.create(get_model_config("tiny", num_layers=2), layout, seq_length=32,
                          global_batch=2, kernels=KernelChoices.parse("all=torch"),
                          collective_timeout_s=60)
    initialize_parallel(plan.layout, seed=plan.seed, timeout_s=plan.collective_timeout_s)
    rank = dist.get_rank()
    batches = [build_micro_batch([np.random.default_rng(10 * step + rank).integers(0, 512, 32)],
                                 [np.array([20, 12])]) for step in range(3)]
    trained = build_training_state(plan, overlap=True)
    for batch in batches[:2]:
        train_step(trained.chunks, trained.optimizer, trained.scheduler, [batch], 1, 32, 1)
    path = save_checkpoint(root, 2, trained.chunks, trained.optimizer, trained.scheduler,
                           plan.model, plan.layout, {"consumed_samples": 4})
    loaded = build_training_state(plan, overlap=False)
    load_checkpoint(path, loaded.chunks, loaded.optimizer, loaded.scheduler, plan.model,
                    plan.layout)
    expected, actual = _parameters(trained.chunks), _parameters(loaded.chunks)
    difference = max((expected[name] - actual[name]).abs().max().item() for name in expected)
    losses = [train_step(state.chunks, state.optimizer, state.scheduler, [batches[2]], 1, 32,
                         1).loss for state in (trained, loaded)]
    if rank == 0:
        print(json.dumps({"largest_difference": difference, "losses": losses}), flush=True)
    destroy_parallel()


if __name__ == "__main__":
    main()
