"""Memory planner: which (TP, PP, CP, DP, recompute) layouts fit a model, sequence length and
GPU count, with a per-GPU breakdown.

    python -m engine.planner --model llama3-8b --seq-length 524288 --gpus 8 --gpu-memory-gb 80

engine.planner.memory holds the model of memory; engine.planner.measure checks it against
measured memory of small CPU runs (bench/planner/RESULTS.md).
"""
from engine.planner.memory import (
    MemoryBreakdown,
    Workload,
    candidate_layouts,
    estimate_memory,
)
from engine.planner.plan import Plan, plan_layouts

__all__ = ["MemoryBreakdown", "Plan", "Workload", "candidate_layouts",
           "estimate_memory", "plan_layouts"]
