"""Enumerate layouts, keep those that fit, recommend one."""
from __future__ import annotations

from dataclasses import dataclass

from engine.model.config import LlamaConfig
from engine.parallel.layout import ParallelLayout
from engine.planner.memory import (
    GIB,
    USABLE_FRACTION,
    MemoryBreakdown,
    Workload,
    candidate_layouts,
    estimate_memory,
    relative_step_time,
)


class PlanError(ValueError):
    """No layout fits: the message names the values and what to change."""


@dataclass
class Plan:
    layout: ParallelLayout
    memory: MemoryBreakdown
    cost: float  # relative_step_time: lower is faster
    budget: float  # bytes per GPU a layout may use (USABLE_FRACTION of the GPU's memory)

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.budget


def plan_layouts(model: LlamaConfig, work: Workload, gpus: int, gpu_memory_gb: float,
                 cp_algorithms=("all-gather", "ulysses"), global_batch: int = 16,
                 ) -> tuple[list[Plan], list[Plan]]:
    """(layouts that fit sorted best first, the closest misses) for ``gpus`` GPUs.

    ``global_batch`` (sequences per step) sets the micro-batches per pipeline, hence the bubble.
    """
    budget = gpu_memory_gb * GIB * USABLE_FRACTION
    fitting, missing = [], []
    for layout in candidate_layouts(model, gpus, work.seq_length, cp_algorithms):
        if global_batch % (layout.data_parallel * work.micro_batch):
            continue
        memory = estimate_memory(model, layout, work)
        microbatches = global_batch // (layout.data_parallel * work.micro_batch)
        plan = Plan(layout, memory, relative_step_time(layout, microbatches), budget)
        (fitting if plan.fits else missing).append(plan)
    fitting.sort(key=lambda p: (p.cost, p.memory.total))
    missing.sort(key=lambda p: p.memory.total)
    return fitting, missing


def check_fits(model: LlamaConfig, layout: ParallelLayout, work: Workload, gpu_memory_gb: float) -> None:
    """Raise PlanError naming the values and the fix if ``layout`` does not fit."""
    memory = estimate_memory(model, layout, work)
    budget = gpu_memory_gb * GIB * USABLE_FRACTION
    if memory.total > budget:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in memory.as_gib().items() if k != "total")
        raise PlanError(
            f"{layout.describe()} needs {memory.total / GIB:.1f} GiB per GPU at seq_length "
            f"{work.seq_length} ({parts} GiB) but {gpu_memory_gb:g} GB GPUs leave "
            f"{budget / GIB:.1f} GiB: raise context_parallel, use recompute=full, or run "
            f"`python -m engine.planner` to list layouts that fit")
