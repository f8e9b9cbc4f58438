"""The evaluation measures, computed through the engine's own model in its parallel layout.

    results = teacher_forced_results(chunks, plan, examples)       # recall, any length
    buckets, n = position_losses(chunks, plan, reader, ids, length)  # does more context help?
    short = short_document_loss(chunks, plan, reader, ids, length)  # did short ability survive?
    loss, tokens = validation_loss(chunks, plan, samples, indices)  # held-out training loss

Every function is collective over the job and returns the same result on every rank. Samples
are padded to a multiple of 2 x CP (x TP under sequence parallelism) with a separate padding
document, which attention never sees from the real tokens and no measure counts.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Optional, Sequence

import numpy as np
from tqdm import tqdm

from data_tools.indexed import IndexedReader
from engine.evaluate.engine_scores import score_samples
from engine.evaluate.position_loss import MeanLossAccumulator, PositionLossAccumulator
from engine.evaluate.scoring import ExampleResult, score_teacher_forced
from engine.evaluate.tasks import RecallExample
from engine.parallel.layout import ParallelLayout
from engine.training.data import InMemorySequences, SampleSource, targets_and_mask
from engine.training.metrics import is_logging_rank
from engine.training.run_plan import RunPlan


# Samples are padded to a multiple of this too, so that examples whose answers differ by a few
# tokens share one padded length and run as micro-batches of one pass.
LENGTH_GRANULE = 128


def padded_length(tokens: int, layout: ParallelLayout) -> int:
    """``tokens`` rounded up to a multiple of LENGTH_GRANULE and of what ``layout`` splits:
    2 x CP chunks, each over TP under sequence parallelism."""
    multiple = math.lcm(LENGTH_GRANULE, 2 * layout.context_parallel * (
        layout.tensor_parallel if layout.sequence_parallel else 1))
    return -(-tokens // multiple) * multiple


def plan_for_length(plan: RunPlan, seq_length: int, trained_context: Optional[int] = None) -> RunPlan:
    """``plan`` at ``seq_length`` tokens per sample; a length beyond the context the model was
    trained for warns and still runs (RoPE has no table to outgrow)."""
    trained = trained_context or plan.model.max_position_embeddings
    if seq_length > trained and is_logging_rank():
        # Printed, not warnings.warn: launchers often silence Python warnings.
        print(f"warning: evaluating {seq_length} tokens, beyond the {trained} tokens of context "
              f"this model was trained for (max_position_embeddings)", flush=True)
    model = plan.model.replace(max_position_embeddings=max(trained, seq_length))
    return plan.replace(model=model, seq_length=seq_length,
                        global_batch=plan.layout.data_parallel * plan.layout.pipeline_parallel,
                        micro_batch=1)


def _padded_samples(sequences: Sequence[np.ndarray], doc_lengths: Sequence[Sequence[int]],
                    length: int, scored: Optional[Sequence[tuple[int, int]]] = None
                    ) -> SampleSource:
    """In-memory samples of ``length`` tokens: each sequence, then padding as its own document.
    ``scored``: per sequence, the [start, end) tokens whose prediction is scored (default all)."""
    tokens, documents, masks = [], [], []
    for k, (sequence, lengths) in enumerate(zip(sequences, doc_lengths)):
        pad = length - len(sequence)
        tokens.append(np.concatenate([np.asarray(sequence, np.int64), np.zeros(pad, np.int64)]))
        documents.append(np.asarray([*lengths, pad] if pad else list(lengths), dtype=np.int64))
        if scored is not None:
            mask = np.zeros(length, dtype=np.float32)
            mask[scored[k][0]:scored[k][1]] = 1
            masks.append(mask)
    return SampleSource(InMemorySequences(tokens, documents, masks), length)


def teacher_forced_results(chunks, plan: RunPlan, examples: Sequence[RecallExample],
                           trained_context: Optional[int] = None,
                           progress: bool = True) -> list[ExampleResult]:
    """Teacher-forced greedy scoring of ``examples``: one forward pass over prompt + answer
    each, scoring only the answer tokens; the argmax at the answer positions decides which gold
    values greedy decoding would reproduce (engine.evaluate.scoring.score_teacher_forced), with
    the mean answer-token loss."""
    groups = defaultdict(list)
    for i, example in enumerate(examples):
        total = len(example.prompt_ids) + len(example.answer_ids)
        groups[padded_length(total, plan.layout)].append(i)
    results: list[Optional[ExampleResult]] = [None] * len(examples)
    bar = tqdm(total=len(examples), desc="teacher-forced", unit="example",
               disable=not (progress and is_logging_rank()))
    for length, members in sorted(groups.items()):
        sequences = [np.concatenate([examples[i].prompt_ids, examples[i].answer_ids])
                     for i in members]
        answers = [(len(examples[i].prompt_ids), len(s)) for i, s in zip(members, sequences)]
        samples = _padded_samples(sequences, [[len(s)] for s in sequences], length, answers)
        scores = score_samples(chunks, plan_for_length(plan, length, trained_context), samples,
                               range(len(members)))
        for k, i in enumerate(members):
            example, answer = examples[i], len(examples[i].answer_ids)
            start = len(example.prompt_ids) - 1  # position t predicts token t + 1
            predicted = scores[k].argmax[start:start + answer]
            answer_loss = float(np.mean(scores[k].loss[start:start + answer]))
            results[i] = ExampleResult.of(example, score_teacher_forced(example, predicted),
                                          answer_loss=answer_loss, predicted_ids=predicted)
        bar.update(len(members))
    bar.close()
    return results


def position_losses(chunks, plan: RunPlan, reader: IndexedReader, chosen: list[int],
                    length: int, trained_context: Optional[int] = None):
    """(PositionLossAccumulator over positions 0..length-2 of the first ``length`` tokens of the
    ``chosen`` documents of ``reader``, each at least that long; how many documents)."""
    buckets = PositionLossAccumulator(length)
    if not chosen:
        return buckets, 0
    padded = padded_length(length, plan.layout)
    samples = _padded_samples([reader.get(i, 0, length) for i in chosen],
                              [[length]] * len(chosen), padded)
    scores = score_samples(chunks, plan_for_length(plan, padded, trained_context), samples,
                           range(len(chosen)))
    for k in range(len(chosen)):
        buckets.add(scores[k].loss[:length - 1])
    return buckets, len(chosen)


def short_document_loss(chunks, plan: RunPlan, reader: IndexedReader, chosen: list[int],
                        length: int) -> MeanLossAccumulator:
    """Token-weighted mean loss of the ``chosen`` documents of ``reader`` (each of 2 to
    ``length`` - 1 tokens), packed whole into ``length``-token samples with document masks."""
    short = MeanLossAccumulator()
    if not chosen:
        return short
    padded = padded_length(length, plan.layout)
    sequences, doc_lengths, current, current_lengths = [], [], [], []
    for i in chosen:
        tokens = reader.get(i)
        if sum(current_lengths) + len(tokens) > length:
            sequences.append(np.concatenate(current))
            doc_lengths.append(current_lengths)
            current, current_lengths = [], []
        current.append(np.asarray(tokens, np.int64))
        current_lengths.append(len(tokens))
    sequences.append(np.concatenate(current))
    doc_lengths.append(current_lengths)
    samples = _padded_samples(sequences, doc_lengths, padded)
    scores = score_samples(chunks, plan_for_length(plan, padded), samples, range(len(sequences)))
    for k, lengths in enumerate(doc_lengths):
        start = 0
        for n in lengths:  # position t predicts token t + 1 of the same document
            short.add(scores[k].loss[start:start + n - 1])
            start += n
    return short


def validation_loss(chunks, plan: RunPlan, samples: SampleSource,
                    indices: Sequence[int]) -> tuple[float, int]:
    """(token-averaged loss, tokens) over held-out samples, with the training loss's masking:
    padding and SFT-masked targets, and (data.mask_cross_document) cross-document targets."""
    mask_cross_document = plan.data.mask_cross_document if plan.data else True
    scores = score_samples(chunks, plan, samples, indices,
                           position_mode=plan.data.position_mode if plan.data else "continuous",
                           mask_cross_document=mask_cross_document)
    loss_sum, tokens = 0.0, 0
    for i in indices:
        window = samples.window(i, 0, samples.seq_length)
        token_mask = None if window.loss_mask is None else window.loss_mask.astype(np.float32)
        _, mask = targets_and_mask(np.asarray(window.tokens, np.int64), window.doc_lengths,
                                   token_mask, mask_cross_document)
        counted = mask > 0  # exactly the positions score_samples scored
        loss_sum += float(scores[i].loss[counted].sum())
        tokens += int(counted.sum())
    return loss_sum / max(tokens, 1), tokens
