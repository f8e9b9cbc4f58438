"""Recall: the suite of engine.evaluate.tasks at exact lengths and depths, scored teacher-forced
through the engine, and generated or teacher-forced through transformers."""
from __future__ import annotations

from typing import Optional

import numpy as np

from data_tools.tokenizer import load_tokenizer
from engine.evaluate import hf_model
from engine.evaluate.engine_eval import teacher_forced_results
from engine.evaluate.errors import EvaluationError
from engine.evaluate.examples_file import examples_text
from engine.evaluate.haystack import load_haystack
from engine.evaluate.inputs import depth_setting
from engine.evaluate.measures import Flag, Measure, MeasureRequest, Prepared, depths
from engine.evaluate.scoring import recall_cells
from engine.evaluate.tasks import TASKS, RecallSuite, check_tokenizer_vocabulary

# The command's examples per (task, length, depth) when neither --samples nor a config sets
# them: at 5 depths 100 per task and length, a 95% interval about +-0.1 wide. The config's own
# eval.samples default stays 1, so recall during training stays cheap.
DEFAULT_SAMPLES = 20


class PreparedRecall(Prepared):
    def __init__(self, suite: RecallSuite, examples: list, seed: int):
        self.suite, self.examples, self.seed = suite, examples, seed
        self.longest = max([len(e.prompt_ids) + len(e.answer_ids) for e in examples] + [2])

    def run_engine(self, chunks, plan, trained_context, progress):
        return teacher_forced_results(chunks, plan, self.examples, trained_context, progress)

    def run_hf(self, model, scoring, progress):
        if scoring == "generation":
            return hf_model.evaluate_generation(model, self.suite.tokenizer, self.examples,
                                                progress=progress)
        return hf_model.evaluate_teacher_forced(model, self.examples, progress=progress)

    def contribute(self, report, result) -> None:
        described = self.suite.describe()
        report.tokenizer = described.get("tokenizer", {})
        report.seed = self.seed
        report.haystack = described.get("haystack")
        report.recall = recall_cells(result)
        report.results = result  # per example, for examples.jsonl (not part of report.json)

    def metrics(self, result) -> dict:
        """{"recall": mean over examples, "recall/TASK/LENGTH": mean over its depths}."""
        values = {"recall": float(np.mean([r.score for r in result]))}
        by_task_length = {}
        for cell in recall_cells(result):
            by_task_length.setdefault(f"recall/{cell.task}/{cell.length}", []).append(cell.score)
        values.update({k: float(np.mean(v)) for k, v in by_task_length.items()})
        return values

    def examples_file(self, reports) -> dict[str, str]:
        return {"examples.jsonl": examples_text(self.examples, reports, self.suite.tokenizer)}


class Recall(Measure):
    name = "recall"
    protocol_description = "this suite at exact lengths and depths"
    order = 10
    asked = "--lengths (recall)"
    stages = ("command", "interval", "final")
    tasks = TASKS
    command_defaults = {"samples": DEFAULT_SAMPLES}
    flags = (
        Flag("tokenizer", "--tokenizer", {"help": "the model's tokenizer (file or folder)"}),
        Flag("tasks", "--tasks", {"nargs": "+", "choices": TASKS,
                                  "help": f"default: all of {', '.join(TASKS)}"}),
        Flag("lengths", "--lengths", {"nargs": "+", "type": int,
                                      "help": "prompt lengths in tokens"}),
        Flag("depths", "--depths", {"nargs": "+", "type": float,
                                    "help": "needle depths in [0, 1], or one count to sweep "
                                            "(default 3)"}, depth_setting),
        Flag("samples", "--samples", {"type": int, "help": (
            f"examples per (task, length, depth) (default {DEFAULT_SAMPLES}, or the config's "
            f"eval.samples)")}),
        Flag("seed", "--seed", {"type": int}),
        Flag("haystack", "--haystack", {"help": "'noise' (RULER's), an indexed dataset prefix, "
                                                "or a folder of text files"}),
    )

    def prepare(self, request: MeasureRequest) -> Optional[PreparedRecall]:
        section = request.section
        lengths = section.lengths
        if request.stage == "final":
            lengths = section.final_lengths or section.lengths
        if not lengths:
            return None
        names = request.names
        if not section.tokenizer:
            raise EvaluationError(f"{names['lengths']} needs {names['tokenizer']}: the recall "
                                  f"suite is built with the model's own tokenizer")
        suite = request.shared.get("recall_suite")
        if suite is None:
            # The command loads it once, to check it against the models first.
            tokenizer = request.shared.get("tokenizer") or load_tokenizer(section.tokenizer)
            for what, vocab in request.vocabularies.items():
                check_tokenizer_vocabulary(tokenizer, vocab, what)
            # One model: its vocabulary also bounds the ids of every prompt.
            vocab = (next(iter(request.vocabularies.values()))
                     if len(request.vocabularies) == 1 else None)
            suite = RecallSuite(tokenizer, load_haystack(section.haystack, tokenizer),
                                seed=section.seed, vocab_size=vocab)
            request.shared["recall_suite"] = suite
        # Every example is made now, before any process group: a haystack too small for a
        # length fails here, in seconds.
        examples = list(suite.examples(section.tasks or TASKS, lengths, depths(section),
                                       section.samples))
        return PreparedRecall(suite, examples, section.seed)


MEASURE = Recall()
