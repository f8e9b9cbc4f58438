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


from data_tools.packed_dataset import METADATA_FILE, PackedDataset
from data_tools.stats import recorded_tokenizer
from data_tools.tokenizer import TokenizerError
from engine.evaluate.engine_eval import padded_length, validation_loss
from engine.evaluate.errors import EvaluationError
from engine.evaluate.inputs import SETTINGS, check_recorded_tokenizers, tokenizer_inputs
from engine.evaluate.measures import Measure, Prepared, prepare_measures, training_request
from engine.evaluate.report import CheckpointReport, EvaluationReport, write_report
from engine.training.config import ConfigError, EvalSection
from engine.training.data import SampleSource
from engine.training.metrics import is_logging_rank
from engine.training.run_plan import RunPlan


def _check_tokenizers(section: EvalSection, plan: RunPlan, shared: dict) -> None:
    """The tokenizer and data that evaluation feeds the model are of the tokenizer of the run's
    ids (its data's, else its checkpoint's), where both are recorded."""
    if plan.data is None or not plan.data.tokenizer:
        return
    suite = shared.get("recall_suite")
    inputs = tokenizer_inputs(section, SETTINGS, suite.tokenizer if suite else None)
    if section.data:
        inputs[f"eval.data {section.data}"] = recorded_tokenizer(section.data)
    try:
        check_recorded_tokenizers({f"data.path {plan.data.path}": plan.data.tokenizer}, inputs,
                                  "holds ids of")
    except EvaluationError as error:
        raise ConfigError(str(error)) from None


@dataclass
class Validation:
    section: EvalSection
    plan: RunPlan
    samples: Optional[SampleSource]  # held-out packed data for the validation loss
    indices: list[int]
    # The measures (engine.evaluate.measures) run every eval.interval steps (recall at
    # eval.lengths) and those of the final report (at eval.final_lengths), prepared.
    interval_measures: list[tuple[Measure, Prepared]]
    final_measures: list[tuple[Measure, Prepared]]

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
        shared = {}  # the recall suite, built once for both stages
        try:
            interval_measures = (prepare_measures(training_request(
                section, "interval", plan.model.vocab_size, shared)) if section.interval else [])
            final_measures = (prepare_measures(training_request(
                section, "final", plan.model.vocab_size, shared)) if section.final else [])
        except (EvaluationError, TokenizerError) as error:
            # Errors naming an eval.* setting read as they are; others get the section's name.
            message = str(error)
            raise ConfigError(message if message.startswith("eval.") else f"eval: {message}"
                              ) from None
        _check_tokenizers(section, plan, shared)
        longest = max([ready.longest for _, ready in interval_measures + final_measures]
                      + [section.position_length, 2])
        # The longest sample must fit the layout; checked now, not at the first evaluation.
        padded = padded_length(longest, plan.layout)
        plan.replace(seq_length=padded,
                     model=plan.model.replace(max_position_embeddings=max(
                         padded, plan.model.max_position_embeddings)),
                     global_batch=plan.layout.data_parallel * plan.layout.pipeline_parallel,
                     micro_batch=1)
        return cls(section, plan, samples, indices, interval_measures, final_measures)

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
        for _, ready in self.interval_measures:
            values.update(ready.metrics(ready.run_engine(chunks, self.plan, None, False)))
        return values

    def final_report(self, chunks, name: str, checkpoint: str, out_dir: Path) -> Optional[dict]:
        """The full evaluation of the run's final weights into ``out_dir`` (rank 0 writes)."""
        results = [ready.run_engine(chunks, self.plan, None, False)
                   for _, ready in self.final_measures]
        if not is_logging_rank():
            return None
        report = CheckpointReport(name=name, checkpoint=checkpoint, scoring="teacher_forced")
        for (_, ready), result in zip(self.final_measures, results):
            ready.contribute(report, result)
        return write_report(EvaluationReport([report]), str(out_dir))
