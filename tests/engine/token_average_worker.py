"""Worker for test_token_averaged_loss (run under torchrun, one process).

Trains one step with lr 0 and no clipping (it rescales the gradients in place) on two micro-batches holding 30 and 5 valid tokens, then recomputes
the gradient of sum(token losses) / 35 with plain autograd and prints both, plus the gradient of
the per-micro-batch average (the wrong rule), as JSON.
"""
import json
import sys

import numpy as np
import torch


def main() -> None:
    from engine.model.config import get_model_config
    from engine.model.kernel_choices import KernelChoices
    from engine.parallel.layout import ParallelLayout
    from engine.parallel.setup import initialize_parallel
    from engine.training.build import build_training_state
    from engine.training.config import OptimizerSection
    from engine.training.data import build_micro_batch
    from engine.training.run_plan import RunPlan
    from engine.training.step import train_step

    plan = RunPlan.create(get_model_config("tiny", num_layers=2), ParallelLayout(),
                          seq_length=32, global_batch=2, kernels=KernelChoices.parse("all=torch"),
                          seed=3, collective_timeout_s=60,
                          optimizer=OptimizerSection(lr=0.0, min_lr_ratio=0.0, clip_grad=0.0,
                                                      warmup_fraction=0.0))
    initialize_parallel(plan.layout, seed=plan.seed, timeout_s=plan.collective_timeout_s)
    state = build_training_state(plan)
    chunks, optimizer, scheduler = state.chunks, state.optimizer, state.scheduler
    rng = np.random.default_rng(0)
    batches = []
    for valid in (30, 5):
        mask = np.zeros(32, dtype=np.float32)
        mask[1:valid + 1] = 1  # target i counts when token i + 1 is marked
        batches.append(build_micro_batch([rng.integers(0, 512, 32)], [np.array([20, 12])],
                                         [mask], mask_cross_document=False))
    assert [int(b.loss_mask.sum()) for b in batches] == [30, 5]
    result = train_step(chunks, optimizer, scheduler, batches, 2, 32, 1)
    trained = torch.cat([p.main_grad.flatten().clone() for p in chunks[0].parameters()])

    def autograd_gradient(per_microbatch_average: bool):
        chunks[0].zero_grad_buffer()
        optimizer.zero_grad()  # megatron's step leaves param.grad aliasing main_grad
        total = sum(float(b.loss_mask.sum()) for b in batches)
        loss_value = 0.0
        for b in batches:
            losses = chunks[0](b.tokens, b.position_ids, None, labels=b.labels,
                               packed_seq_params=b.packed_seq_params())
            token_sum = (losses.float() * b.loss_mask).sum()
            scale = (2 * b.loss_mask.sum()) if per_microbatch_average else total
            (token_sum / scale).backward()  # megatron's DDP hooks accumulate into main_grad
            loss_value += float(token_sum) / total
        return torch.cat([p.main_grad.flatten().clone() for p in chunks[0].parameters()]), loss_value

    token_average, expected_loss = autograd_gradient(False)

    microbatch_average, _ = autograd_gradient(True)
    print(json.dumps({
        "reported_loss": result.loss, "expected_loss": expected_loss,
        "error_vs_token_average": float((trained - token_average).norm() / token_average.norm()),
        "error_vs_microbatch_average": float((trained - microbatch_average).norm()
                                             / microbatch_average.norm()),
    }))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
