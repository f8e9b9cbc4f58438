"""The optimizer of a run: megatron-core's AdamW and its learning-rate schedule, built from the
config's optimizer section (engine.training.config.OptimizerSection)."""
from __future__ import annotations

import torch
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.utils import get_model_config

from engine.training.config import OptimizerSection


def build_optimizer(model_chunks, settings: OptimizerSection, train_steps: int, *, bf16: bool,
                    distributed_optimizer: bool):
    """megatron's AdamW (distributed over DP x CP ranks if asked) and its lr/wd scheduler.

    Warm-up is linear over W = warmup_fraction x train_steps steps and the first step already
    trains: step k (1-based) of the warm-up runs at lr x k / W (megatron's scheduler, which
    starts at init_lr, is given init_lr = lr / W and W - 1 warm-up steps). Then cosine decay to
    lr x min_lr_ratio at the end of the run.
    """
    config = OptimizerConfig(
        optimizer="adam",
        lr=settings.lr,
        min_lr=settings.lr * settings.min_lr_ratio,
        weight_decay=settings.weight_decay,
        adam_beta1=settings.beta1,
        adam_beta2=settings.beta2,
        adam_eps=settings.eps,
        clip_grad=settings.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, model_chunks)
    warmup = settings.warmup_steps(train_steps)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=settings.lr / max(warmup, 1),
        max_lr=settings.lr,
        min_lr=settings.lr * settings.min_lr_ratio,
        lr_warmup_steps=max(warmup - 1, 0),
        lr_decay_steps=max(train_steps, warmup),
        lr_decay_style="cosine",
        start_wd=settings.weight_decay,
        end_wd=settings.weight_decay,
        wd_incr_steps=max(train_steps, 1),
        wd_incr_style="constant",
    )
    model_config = get_model_config(model_chunks[0])
    model_config.finalize_model_grads_func = finalize_model_grads
    model_config.grad_scale_func = optimizer.scale_loss
    return optimizer, scheduler
