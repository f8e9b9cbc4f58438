"""The evaluation's GPU path proven without a GPU: one teacher-forced scoring forward at the
longest requested length, for one rank of N, on the ``meta`` device under torch's fake process
group (engine.simulation, as the training dry run, engine.dryrun).

    python -m engine.evaluate --dry-run --world-size 8 --checkpoint runs/stage1 --lengths 65536
    python -m engine.evaluate --dry-run --world-size 8 --config engine/configs/prolong-stage1-64k.yaml \\
        --lengths 65536

The model is built as a GPU evaluation builds it (engine.training.build.build_inference_model: no
DDP, so no gradient buffers), with the shape the checkpoint recorded (or the config's model) and no weights
loaded. One synthetic sample of the longest measure's length runs through the scoring path of
every evaluation measure (engine.evaluate.engine_scores.rank_scores: the pipeline schedule
forward-only, the output layer's chunked scores, csrc.linear_cross_entropy.linear_token_scores,
the context-parallel gather, the read-back to the host): a recall example (a prompt of the
longest --lengths, then ANSWER_TOKENS answer tokens, only those scored) or, when
--position-length is longer, a loss-by-position sample with every position scored. The answer
positions come from the sample's loss mask, copied from the host, so the mask's torch.nonzero
gets the shape a GPU computes. Not run: the exchange of host results between ranks at the end of
score_samples (torch's all_gather_object of Python objects; under the fake group every rank
would receive this rank's).

Fails, naming the tensor, the operation and the engine line, where a GPU run would: a host
tensor meeting a device tensor, a host tensor handed to a collective, shape errors. Prints this
rank's peak device memory by kind (weights, temporaries).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from engine.device import simulated_accelerator
from engine.evaluate.engine_eval import _padded_samples
from engine.evaluate.engine_scores import rank_scores
from engine.simulation import (
    GIB,
    KINDS,
    DryRunMode,
    allow_object_collectives,
    emit_result,
    end_simulated_rank,
    in_rank_process,
    parameter_names,
    peak_by_kind,
    pipeline_stage,
    run_ranks_in_processes,
    start_simulated_rank,
    storage_kinds,
)
from engine.training.build import build_inference_model
from engine.training.run_plan import RunPlan

# Answer tokens of the simulated recall example: above this suite's longest answers (a UUID,
# four 7-digit values or five variable names: under 40 Llama-3 tokens); samples are padded to
# a multiple of 128 tokens anyway (engine_eval.LENGTH_GRANULE).
ANSWER_TOKENS = 64


@dataclass
class EvaluationSample:
    """The forward a dry run simulates: ``tokens`` tokens, ``scored`` = the [start, end) tokens
    whose prediction is scored (None: every position)."""
    measure: str  # "recall" | "loss by position"
    tokens: int
    scored: Optional[tuple[int, int]]


def longest_sample(lengths, position_length: int) -> EvaluationSample:
    """The longest forward the requested measures run: recall at the longest of ``lengths``, or
    the loss by position at ``position_length`` when that is longer."""
    recall = max(lengths, default=0)
    if recall and recall + ANSWER_TOKENS >= position_length:
        return EvaluationSample("recall", recall + ANSWER_TOKENS,
                                (recall, recall + ANSWER_TOKENS))
    return EvaluationSample("loss by position", position_length, None)


def run_rank(plan: RunPlan, sample: EvaluationSample, rank: int, world_size: int) -> dict:
    """One scoring forward of ``sample`` (``plan.seq_length``: its padded length) as rank
    ``rank`` of ``world_size``, in this process: this rank's peak memory by kind."""
    started = time.process_time()
    start_simulated_rank(plan.layout, rank, world_size, plan.seed, plan.kernels.attention)
    stage = pipeline_stage()
    names: dict = {}
    mode = DryRunMode(names)
    allow_object_collectives(mode)
    with simulated_accelerator("meta"), mode:
        chunks = build_inference_model(plan)
        names.update(parameter_names(chunks))
        mode.reclassify(storage_kinds(chunks, other="weights"))
        # The real sample layout (engine_eval: the text, then padding as its own document);
        # token ids do not matter to shapes.
        samples = _padded_samples([np.zeros(sample.tokens, np.int64)], [[sample.tokens]],
                                  plan.seq_length, None if sample.scored is None
                                  else [sample.scored])
        mode.phase = "step"
        rank_scores(chunks, plan, samples, [0])
    end_simulated_rank()
    peak = peak_by_kind(mode)
    return {"rank": rank, "stage": stage, "measure": sample.measure, "tokens": sample.tokens,
            "seq_length": plan.seq_length, "peak": peak,
            "cpu_seconds": time.process_time() - started}


def format_result(result: dict, plan: RunPlan) -> str:
    peak = result["peak"]
    scored = "answer tokens scored" if result["measure"] == "recall" else "every position scored"
    lines = [f"evaluation dry run: rank {result['rank']} ({result['stage']} pipeline stage) of "
             f"{plan.layout.describe()}, one {result['measure']} sample of {result['tokens']} "
             f"tokens ({result['seq_length']} padded, {scored}), "
             f"{'bf16' if plan.bf16 else 'fp32'}, {result['cpu_seconds']:.1f} s of CPU",
             "  peak memory (GiB)"]
    for kind in KINDS:
        if peak[kind] or kind in ("weights", "temporaries"):
            lines.append(f"  {kind:<26} {peak[kind] / GIB:9.2f}")
    lines.append(f"  {'total':<26} {peak['total'] / GIB:9.2f}")
    return "\n".join(lines)


def run(plan: RunPlan, sample: EvaluationSample, world_size: int, ranks: list[int],
        report: Optional[str]) -> int:
    """The dry run of ``ranks``, each in a fresh process (process groups and the meta
    redirection are process-wide); prints and writes the report; 0 on success."""
    if in_rank_process(ranks):
        result = run_rank(plan, sample, ranks[0], world_size)
        print(format_result(result, plan), flush=True)
        emit_result(result)
        return 0
    code, results = run_ranks_in_processes("engine.evaluate", ranks)
    if code:
        return code
    if report:
        Path(report).write_text(json.dumps({"layout": plan.layout.describe(),
                                            "world_size": world_size, "ranks": results},
                                           indent=1))
    return 0
