"""What RULER's and HELMET's protocols share as measures: prompts built from the protocol's own
tasks and data, scored on the text a transformers model generates greedily within each task's
budget. A protocol is a ``GeneratedProtocol`` with its tasks, its data flags, ``build`` (every
example) and ``score`` (one output against the gold values); this module holds no measure."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from data_tools.tokenizer import TextTokenizer, load_tokenizer
from engine.evaluate.errors import EvaluationError
from engine.evaluate.hf_model import greedy_generate
from engine.evaluate.measures import Flag, Measure, MeasureRequest, Prepared
from engine.evaluate.report import ProtocolResult, protocol_cells
from engine.evaluate.ruler import encode_prompt

# RULER and lm-evaluation-harness score 500 examples per task and length; 100 keeps the 95%
# interval of an exact-match score within about +-0.1.
DEFAULT_SAMPLES = 100
DEFAULT_SEED = 42


@dataclass
class GeneratedOutput:
    output: str   # the generated text as the protocol scores it
    score: float  # in [0, 1]


class PreparedGenerated(Prepared):
    def __init__(self, measure: "GeneratedProtocol", examples: list, tokenizer: TextTokenizer,
                 seed: int, chat_source: Optional[str]):
        self.measure, self.examples, self.tokenizer = measure, examples, tokenizer
        self.seed, self.chat_source = seed, chat_source
        self.longest = max([e.prompt_tokens + e.tokens_to_generate for e in examples] + [2])

    def run_hf(self, model, scoring, progress) -> list[GeneratedOutput]:
        bos = [self.tokenizer.bos_id] if self.tokenizer.bos_id is not None else []
        results = []
        for example in self.examples:
            # RULER's and HELMET's Hugging Face clients tokenize the prompt with the model's
            # tokenizer, which puts BOS first (once: a chat template's own BOS is kept alone).
            ids = encode_prompt(self.tokenizer, example.prompt)
            ids = ids if ids[:1] == bos else bos + ids
            new = greedy_generate(model, [ids], example.tokens_to_generate)[0]
            text = self.tokenizer.decode([int(t) for t in new])
            results.append(GeneratedOutput(*self.measure.score(example, text)))
        return results

    def rows(self, results: Optional[list[GeneratedOutput]] = None) -> list[dict]:
        """One row per example (examples.jsonl), with the model's output and score if given."""
        rows = []
        for i, e in enumerate(self.examples):
            row = {"protocol": self.measure.protocol, "task": e.task, "length": e.length,
                   "index": e.index, "input": e.input, "answer_prefix": e.answer_prefix,
                   "prompt_tokens": e.prompt_tokens, "outputs": e.outputs,
                   "tokens_to_generate": e.tokens_to_generate, "metric": e.metric,
                   "scoring": "generated", "chat_template": self.chat_source}
            if results is not None:
                row.update(output=results[i].output, score=results[i].score)
            rows.append(row)
        return rows

    def contribute(self, report, result) -> None:
        report.tokenizer = self.tokenizer.describe()
        report.seed = self.seed
        report.results = result  # per example, for examples.jsonl (not part of report.json)
        report.protocol = ProtocolResult(self.measure.protocol, self.seed,
                                         protocol_cells(self.rows(result)))

    def examples_file(self, reports) -> dict[str, str]:
        # A protocol's report holds one model; without one, the examples alone.
        rows = self.rows(reports[0].results if reports else None)
        return {"examples.jsonl": "".join(json.dumps(row, ensure_ascii=False) + "\n"
                                          for row in rows)}


class GeneratedProtocol(Measure):
    """A published protocol's tasks (the subclass: ``protocol``, ``tasks``, ``data_flags``,
    ``build``, ``score``)."""
    protocol: str = ""
    tasks: tuple = ()
    data_flags: tuple = ()
    # Only the command: generation needs a transformers model on one device, which a training
    # run does not hold (its chunks are split over the layout and run teacher-forced).
    stages = ("command",)
    command_defaults = {"samples": DEFAULT_SAMPLES, "seed": DEFAULT_SEED}
    needs_generation = True
    single_model = True
    examples_are_output = True

    @property
    def flags(self) -> tuple:
        return (
            Flag("tokenizer", "--tokenizer", {"help": "the model's tokenizer (required)"}),
            Flag("tasks", "--tasks", {"nargs": "+", "metavar": "TASK",
                                      "help": f"default: all of {', '.join(self.tasks)}"}),
            Flag("lengths", "--lengths", {"nargs": "+", "type": int,
                                          "help": "prompt lengths in tokens (required)"}),
            Flag("samples", "--samples", {"type": int, "help": (
                f"examples per task and length (default {DEFAULT_SAMPLES})")}),
            Flag("seed", "--seed", {"type": int, "help": f"default {DEFAULT_SEED}"}),
            *self.data_flags)

    def build(self, section, tokenizer: TextTokenizer, tasks: list[str]
              ) -> tuple[list, Optional[str]]:
        """(every example, the chat template's source or None); EvaluationError naming the
        flag and the fix on bad input."""
        raise NotImplementedError

    def score(self, example, text: str) -> tuple[str, float]:
        """(the output as scored, its score in [0, 1]) of generated ``text``."""
        raise NotImplementedError

    def prepare(self, request: MeasureRequest) -> PreparedGenerated:
        section, names = request.section, request.names
        for key, what in (("tokenizer", "the model's tokenizer"),
                          ("lengths", "the prompt lengths in tokens")):
            if not getattr(section, key):
                raise EvaluationError(f"--protocol {self.protocol} needs {names[key]}: {what}")
        tasks = list(section.tasks or self.tasks)
        unknown = [t for t in tasks if t not in self.tasks]
        if unknown:
            raise EvaluationError(f"unknown {self.protocol} task {unknown[0]!r}; choose from "
                                  f"{', '.join(self.tasks)}")
        tokenizer = request.shared.get("tokenizer") or load_tokenizer(section.tokenizer)
        # Every prompt is built now, before a model is loaded or a file written.
        examples, chat_source = self.build(section, tokenizer, tasks)
        return PreparedGenerated(self, examples, tokenizer, section.seed, chat_source)
