"""Forward-only scoring through the engine's own model in any layout (TP, PP, VPP, CP, DP).

    scores = score_samples(chunks, plan, samples, indices)   # every rank gets every result
    scores[i].loss[t]    # -log p(token t+1 | tokens 0..t) of sample i, fp32
    scores[i].argmax[t]  # the most likely token after tokens 0..t (greedy decoding's choice)

Only the positions the training data path would count are scored (the others hold NaN and -1):
every position but a sample's last, or, when the samples carry token masks, those that predict
a marked token (recall: the answer tokens only, so a 512K prompt's output layer costs little).

One forward pass per sample, no KV cache: what teacher-forced recall scoring and loss by position
need, at any length the training layout holds (512K on the layout the planner gives for
training). Samples are split over data-parallel ranks, each one's tokens over the CP group (the
training data path, engine.training.data), its layers over the pipeline; the output layer's
vocabulary shards give per-token losses and a global argmax without [tokens, vocab] logits
(csrc.linear_cross_entropy.linear_token_scores).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from engine.parallel.context.chunks import gathered_to_sequence_order
from engine.training.data import SampleSource, micro_batch_for_rank
from engine.training.run_plan import RunPlan


@dataclass
class SampleScores:
    loss: np.ndarray  # fp32 [T]: loss[t] = -log p(token t + 1 | tokens <= t); NaN if unscored
    argmax: np.ndarray  # int64 [T]: the model's most likely token after tokens <= t; -1 if unscored


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def _score_step(data_iterator, model):
    batch = next(data_iterator).to_accelerator()
    output = model(batch.tokens, batch.position_ids, None, labels=batch.labels,
                   loss_mask=batch.loss_mask, packed_seq_params=batch.packed_seq_params())
    return output, lambda scores, non_loss_data=True: scores


def scoring_rounds(num_samples: int, plan: RunPlan) -> int:
    """Micro-batches each data-parallel rank runs for ``num_samples`` samples (ranks with fewer
    samples repeat their last one; an interleaved pipeline needs a multiple of PP)."""
    rounds = max(1, math.ceil(num_samples / plan.layout.data_parallel))
    if plan.layout.virtual_stages > 1:
        rounds = math.ceil(rounds / plan.layout.pipeline_parallel) * plan.layout.pipeline_parallel
    return rounds


def score_samples(chunks, plan: RunPlan, samples: SampleSource, indices: Sequence[int],
                  position_mode: str = "continuous",
                  mask_cross_document: bool = False) -> dict[int, SampleScores]:
    """Per-token loss and argmax of samples ``indices`` of ``samples``, on every rank.

    Collective over the whole job. ``samples.seq_length`` must divide by 2 x CP. The model's
    weights are unchanged (no gradient, no optimizer).
    """
    results = rank_scores(chunks, plan, samples, indices, position_mode, mask_cross_document)
    cp_rank = parallel_state.get_context_parallel_rank()
    keep = (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            and parallel_state.get_tensor_model_parallel_rank() == 0 and cp_rank == 0)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results if keep else {})
    merged: dict[int, SampleScores] = {}
    for part in gathered:
        merged.update(part)
    return {i: merged[i] for i in indices}


def rank_scores(chunks, plan: RunPlan, samples: SampleSource, indices: Sequence[int],
                position_mode: str = "continuous",
                mask_cross_document: bool = False) -> dict[int, SampleScores]:
    """score_samples up to the exchange of results between ranks: the forward passes, and on
    the last pipeline stage the scores of this data-parallel rank's samples gathered over the
    CP group, on the host ({} on other stages). Collective over the whole job. Everything a
    device touches happens here (what the evaluation dry run runs)."""
    layout = plan.layout
    indices = list(indices)
    dp_rank = parallel_state.get_data_parallel_rank()
    cp_rank = parallel_state.get_context_parallel_rank()
    rounds = scoring_rounds(len(indices), plan)
    mine = indices[dp_rank::layout.data_parallel] or indices[:1]
    mine = (mine + [mine[-1]] * rounds)[:rounds]
    batches = [micro_batch_for_rank(samples, [i], cp_rank, layout.context_parallel,
                                    position_mode=position_mode,
                                    mask_cross_document=mask_cross_document)
               for i in mine]
    for chunk in chunks:
        _unwrap(chunk).scoring = True
    try:
        with torch.no_grad():
            iterators = [iter(batches) for _ in chunks]
            outputs = get_forward_backward_func()(
                forward_step_func=_score_step,
                data_iterator=iterators if len(chunks) > 1 else iterators[0],
                model=list(chunks), num_microbatches=rounds, seq_length=samples.seq_length,
                micro_batch_size=1, forward_only=True, collect_non_loss_data=True)
    finally:
        for chunk in chunks:
            _unwrap(chunk).scoring = False

    results = {}
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        order = gathered_to_sequence_order(samples.seq_length, layout.context_parallel)
        group = parallel_state.get_context_parallel_group()
        for index, scores in zip(mine, outputs):
            full = []
            for local in (scores.loss.float(), scores.argmax):
                local = local.reshape(-1).contiguous()
                if layout.context_parallel > 1:
                    parts = [torch.empty_like(local) for _ in range(layout.context_parallel)]
                    dist.all_gather(parts, local, group=group)
                    local = torch.cat(parts)[order.to(local.device)]
                full.append(local.cpu().numpy())
            results[index] = SampleScores(full[0], full[1])
    return results
