"""Evaluation inside a training run (the config's ``eval`` section): validation loss and short
recall every ``eval.interval`` steps, and with ``eval.final`` a full report of the final
checkpoint (engine.evaluate's measures, written to LOG_DIR/eval/).

    validation = Validation.prepare(config.eval, plan)   # before any process group: checks
    values = validation.run(chunks)                      # {"loss": .., "recall": .., ...}
    validation.final_report(chunks, name, checkpoint, out_dir)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from data_tools.indexed import IndexedReader
from data_tools.packed_dataset import METADATA_FILE, PackedDataset
from data_tools.tokenizer import TokenizerError, load_tokenizer
from engine.evaluate.engine_eval import (padded_length, position_losses, short_document_loss,
                                         teacher_forced_results, validation_loss)
from engine.evaluate.errors import EvaluationError
from engine.evaluate.haystack import load_haystack
from engine.evaluate.inputs import (SETTINGS, SHORT_LENGTH, long_document_ids,
                                    short_document_ids)
from engine.evaluate.report import CheckpointReport, EvaluationReport, write_report
from engine.evaluate.scoring import recall_cells
from engine.evaluate.tasks import TASKS, RecallExample, RecallSuite, depth_sweep
from engine.training.config import ConfigError, EvalSection
from engine.training.data import SampleSource
from engine.training.metrics import is_logging_rank
from engine.training.run_plan import RunPlan


def _depths(section: EvalSection) -> list[float]:
    depths = section.depths
    if isinstance(depths, int) and not isinstance(depths, bool):
        return depth_sweep(depths)
    if isinstance(depths, list) and depths and all(isinstance(d, (int, float)) for d in depths):
        return [float(d) for d in depths]
    raise ConfigError(f"eval.depths {depths!r}: give a count (e.g. 5) or a list of fractions "
                      f"in [0, 1]")


@dataclass
class Validation:
    section: EvalSection
    plan: RunPlan
    samples: Optional[SampleSource]  # held-out packed data for the validation loss
    indices: list[int]
    suite: Optional[RecallSuite]
    examples: list[RecallExample]  # the recall suite at eval.lengths (during training)
    final_examples: list[RecallExample]  # and at eval.final_lengths (the final report)
    long_reader: Optional[IndexedReader]
    short_reader: Optional[IndexedReader]

    @classmethod
    def prepare(cls, section: EvalSection, plan: RunPlan) -> Optional["Validation"]:
        """Everything checkable before any process group: the held-out data against the
        sequence length and vocabulary, the tokenizer against the model, every recall example
        generated (a haystack too small fails here). None when nothing is asked for."""
        if not (section.interval or section.final):
            return None
        samples, indices = None, []
        if section.data:
            if not (Path(section.data) / METADATA_FILE).exists():
                raise ConfigError(f"eval.data {section.data}: no packed dataset there; build "
                                  f"held-out data with `lce-data mix RECIPE --output "
                                  f"{section.data}`")
            dataset = PackedDataset(section.data)
            if dataset.seq_length % plan.seq_length:
                raise ConfigError(f"eval.data {section.data} is packed at {dataset.seq_length} "
                                  f"tokens, not a multiple of the run's seq_length "
                                  f"{plan.seq_length}: pack it at {plan.seq_length}")
            if dataset.max_token_id is not None and dataset.max_token_id >= plan.model.vocab_size:
                raise ConfigError(f"eval.data {section.data} holds token id "
                                  f"{dataset.max_token_id}, beyond the model's vocabulary of "
                                  f"{plan.model.vocab_size}: tokenize it with the model's "
                                  f"tokenizer")
            samples = SampleSource(dataset, plan.seq_length)
            count = min(section.batches * plan.global_batch, samples.num_samples)
            indices = list(range(count))
        elif section.interval and not section.lengths:
            raise ConfigError("eval.interval is set but there is nothing to evaluate: give "
                              "eval.data (held-out packed data) and/or eval.lengths")
        suite, examples, final_examples = None, [], []
        final_lengths = section.final_lengths or section.lengths
        if section.lengths or (section.final and final_lengths):
            if not section.tokenizer:
                raise ConfigError("eval.lengths needs eval.tokenizer (the model's own tokenizer)")
            try:
                tokenizer = load_tokenizer(section.tokenizer)
                suite = RecallSuite(tokenizer, load_haystack(section.haystack, tokenizer),
                                    seed=section.seed, vocab_size=plan.model.vocab_size)
                tasks, depths = section.tasks or TASKS, _depths(section)
                examples = list(suite.examples(tasks, section.lengths, depths, section.samples))
                if section.final:
                    final_examples = list(suite.examples(tasks, final_lengths, depths,
                                                         section.samples))
            except (EvaluationError, TokenizerError) as error:
                raise ConfigError(f"eval: {error}") from None
        long_reader = short_reader = None
        try:
            if section.final and section.long_documents:
                if section.position_length < 2:
                    raise ConfigError("eval.long_documents needs eval.position_length (tokens)")
                long_reader = IndexedReader(section.long_documents)
                # A measure no document fits is refused now, not after the last step.
                long_document_ids(long_reader, section.long_documents, section.position_length,
                                  section.max_documents, SETTINGS)
            if section.final and section.short_documents:
                short_reader = IndexedReader(section.short_documents)
                short_document_ids(short_reader, section.short_documents,
                                   section.position_length or SHORT_LENGTH,
                                   section.max_short_documents, SETTINGS)
        except EvaluationError as error:
            raise ConfigError(str(error)) from None
        longest = max([len(e.prompt_ids) + len(e.answer_ids)
                       for e in examples + final_examples] + [section.position_length, 2])
        # The longest sample must fit the layout; checked now, not at the first evaluation.
        padded = padded_length(longest, plan.layout)
        plan.replace(seq_length=padded,
                     model=plan.model.replace(max_position_embeddings=max(
                         padded, plan.model.max_position_embeddings)),
                     global_batch=plan.layout.data_parallel * plan.layout.pipeline_parallel,
                     micro_batch=1)
        return cls(section, plan, samples, indices, suite, examples, final_examples,
                   long_reader, short_reader)

    def due(self, step: int, last_step: int) -> bool:
        interval = self.section.interval
        return bool(interval) and (step % interval == 0 or step == last_step)

    def run(self, chunks) -> dict:
        """Validation loss (and tokens) on the held-out samples and recall at eval.lengths:
        {"loss", "tokens", "recall", "recall/TASK/LENGTH"...}. Collective."""
        values = {}
        if self.samples is not None:
            values["loss"], values["tokens"] = validation_loss(chunks, self.plan, self.samples,
                                                               self.indices)
        if self.examples:
            results = teacher_forced_results(chunks, self.plan, self.examples, progress=False)
            values["recall"] = float(np.mean([r.score for r in results]))
            for cell in recall_cells(results):
                key = f"recall/{cell.task}/{cell.length}"
                values.setdefault(key, []).append(cell.score)
            values = {k: float(np.mean(v)) if isinstance(v, list) else v
                      for k, v in values.items()}
        return values

    def final_report(self, chunks, name: str, checkpoint: str, out_dir: Path) -> Optional[dict]:
        """The full evaluation of the run's final weights into ``out_dir`` (rank 0 writes)."""
        results = (teacher_forced_results(chunks, self.plan, self.final_examples,
                                          progress=False) if self.final_examples else [])
        buckets = short = None
        if self.long_reader is not None:
            buckets, _ = position_losses(chunks, self.plan, self.long_reader,
                                         self.section.position_length, self.section.max_documents)
        if self.short_reader is not None:
            short = short_document_loss(chunks, self.plan, self.short_reader,
                                        self.section.position_length or SHORT_LENGTH,
                                        self.section.max_short_documents)
        if not is_logging_rank():
            return None
        described = self.suite.describe() if self.suite else {}
        report = CheckpointReport(
            name=name, checkpoint=checkpoint, scoring="teacher_forced",
            tokenizer=described.get("tokenizer", {}),
            seed=self.section.seed if self.suite else None, haystack=described.get("haystack"),
            recall=recall_cells(results),
            position_loss=buckets.buckets() if buckets is not None else [],
            short_document_loss=short.result() if short is not None and short.tokens else None)
        return write_report(EvaluationReport([report]), str(out_dir))
