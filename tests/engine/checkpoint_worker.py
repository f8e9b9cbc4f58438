"""Worker for test_checkpoint_integrity (torchrun, 2 processes: DP2 with the distributed
optimizer, so each rank holds its own shard of the fp32 main weights and Adam moments).

Trains one step and saves it, then tries to save with a NaN in a weight on rank 1, then with a
NaN in an Adam moment (exp_avg) of rank 0's optimizer shard, then saves again once the values
are restored. Prints, as JSON on rank 0's last line: the two refusals' messages, which tensors
were poisoned (named through megatron's own parameter-to-state map), the checkpoint directory's
contents after each attempt, and the step ``latest`` names.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from engine.checkpoint import CheckpointError, save_checkpoint
from engine.model.config import get_model_config
from engine.model.kernel_choices import KernelChoices
from engine.parallel.layout import ParallelLayout
from engine.parallel.setup import destroy_parallel, initialize_parallel
from engine.training.build import build_training_state
from engine.training.data import build_micro_batch
from engine.training.run_plan import RunPlan
from engine.training.step import train_step


def _contents(root: Path) -> list[str]:
    return sorted(path.name for path in root.iterdir())


def main() -> None:
    root = Path(sys.argv[1])
    layout = ParallelLayout.for_world_size(2, distributed_optimizer=True)
    plan = RunPlan.create(get_model_config("tiny", num_layers=2), layout, seq_length=32,
                          global_batch=2, kernels=KernelChoices.parse("all=torch"),
                          collective_timeout_s=60)
    initialize_parallel(plan.layout, seed=plan.seed, timeout_s=plan.collective_timeout_s)
    state = build_training_state(plan)
    chunks, optimizer = state.chunks, state.optimizer
    rank = dist.get_rank()
    tokens = np.random.default_rng(rank).integers(0, 512, 32)
    batch = build_micro_batch([tokens], [np.array([20, 12])])
    train_step(chunks, optimizer, state.scheduler, [batch], 1, 32, 1)

    def save(step: int):
        try:
            save_checkpoint(root, step, chunks, optimizer, state.scheduler, plan.model,
                            plan.layout, {"consumed_samples": 2 * step}, keep_last=3)
            return None
        except CheckpointError as error:
            return str(error)

    report = {"first": save(1)}
    report["after_first"] = _contents(root)

    params = dict(chunks[0].module.named_parameters())
    weight_name = "decoder.layers.1.mlp.linear_fc2.weight"
    weight = params[weight_name]
    kept = weight.detach().clone()
    if rank == 1:
        with torch.no_grad():
            weight.view(-1)[5] = float("nan")
    report["weight"] = {"name": weight_name, "numel": weight.numel(),
                        "refused": save(2), "after": _contents(root)}
    with torch.no_grad():
        weight.copy_(kept)

    # The first weight whose main copy rank 0's optimizer shard holds (megatron's own map;
    # megatron chains one distributed optimizer per parameter group).
    owned = [(name, param, part) for part in optimizer.chained_optimizers
             for name, param in params.items() if param in part.model_param_group_index_map]
    if rank == 0:
        moment_name, moment_param, part = owned[0]
        exp_avg = part._get_main_param_and_optimizer_states(moment_param)["exp_avg"]
        kept_moment = exp_avg.clone()
        exp_avg.view(-1)[0] = float("inf")
        report["moment"] = {"name": moment_name, "numel": exp_avg.numel()}
    refused = save(3)
    if rank == 0:
        exp_avg.copy_(kept_moment)
        report["moment"].update(refused=refused, after=_contents(root))

    report["last"] = save(4)
    report["after_last"] = _contents(root)
    report["latest"] = (root / "latest").read_text().strip()
    if rank == 0:
        print(json.dumps(report), flush=True)
    destroy_parallel()


if __name__ == "__main__":
    main()
