"""Scoring the recall suite with RULER's metric: the fraction of an example's gold values found.

Two ways to score one `RecallExample` (engine.evaluate.tasks):

- `score_generation(text, gold)`: on generated text, each gold value counts when it occurs in the
  text as a substring, case-insensitively (RULER's `string_match_all`).
- `score_teacher_forced(example, predicted_ids)`: from one forward pass over
  prompt + answer[:-1]; `predicted_ids[i]` is the model's argmax for answer token i given the
  prompt and answer tokens 0..i-1. Gold value j counts only if every answer token up to the last
  token of value j (`example.answer_value_ends[j]` tokens) is the argmax. Then greedy decoding
  from the prompt emits exactly those tokens first, so value j is in the generated text: a value
  found teacher-forced is always found by real greedy generation (given the same argmax, i.e. up
  to numerical ties). The converse does not hold: generation may find a value in other words or
  another order than the canonical answer, so teacher-forced scores are a lower bound.

Helpers: `answer_value_ends(tokenizer, answer_ids, gold)` (how many answer tokens each value
needs), `answer_token_losses(answer_ids, logits=... | log_probs=...)` (next-token loss per answer
token, nats), `ExampleResult` (one scored example) and `recall_cells(results)` (mean score per
task, length and depth: the report's input). Only numpy is imported.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from engine.evaluate.errors import EvaluationError


@dataclass(frozen=True)
class RecallScore:
    """`found[j]`: gold value j was recalled. `correct_prefix`: teacher-forced only, how many
    leading answer tokens were the argmax."""
    found: tuple[bool, ...]
    correct_prefix: Optional[int] = None

    @property
    def score(self) -> float:
        """Fraction of gold values found, in [0, 1]."""
        return sum(self.found) / len(self.found) if self.found else 0.0


def score_generation(text: str, gold: Sequence[str]) -> RecallScore:
    """RULER's metric on generated `text`: gold value j is found when it is a substring of the
    text, ignoring case."""
    lowered = text.lower()
    return RecallScore(tuple(value.lower() in lowered for value in gold))


def correct_prefix_length(answer_ids: np.ndarray, predicted_ids: np.ndarray) -> int:
    """Number of leading answer tokens whose argmax prediction equals the answer token."""
    answer_ids = np.asarray(answer_ids).reshape(-1)
    predicted_ids = np.asarray(predicted_ids).reshape(-1)
    if len(predicted_ids) != len(answer_ids):
        raise EvaluationError(f"{len(predicted_ids)} predicted ids for an answer of "
                              f"{len(answer_ids)} tokens; predict one id per answer token")
    wrong = np.flatnonzero(predicted_ids != answer_ids)
    return int(wrong[0]) if len(wrong) else len(answer_ids)


def score_teacher_forced(example, predicted_ids) -> RecallScore:
    """Teacher-forced greedy score of `example` (a RecallExample) from `predicted_ids` ([A]
    ints: the argmax at each answer position); see the module docstring for why a value counts
    only when the whole answer up to its end is predicted."""
    prefix = correct_prefix_length(example.answer_ids, predicted_ids)
    return RecallScore(tuple(end <= prefix for end in example.answer_value_ends), prefix)


def answer_value_ends(tokenizer, answer_ids: Sequence[int], gold: Sequence[str]) -> tuple[int, ...]:
    """For each gold value, the fewest leading answer tokens whose decoded text contains it
    (ignoring case, as scoring does). Raises EvaluationError when the answer does not contain it."""
    answer_ids = [int(t) for t in answer_ids]
    prefixes = [tokenizer.decode(answer_ids[:k]).lower() for k in range(len(answer_ids) + 1)]
    ends = []
    for value in gold:
        needle = value.lower()
        end = next((k for k, text in enumerate(prefixes) if needle in text), None)
        if end is None or not needle:
            raise EvaluationError(f"gold value {value!r} is not in the decoded answer "
                                  f"{prefixes[-1]!r}; give an answer whose text contains it")
        ends.append(end)
    return tuple(ends)


def answer_token_losses(answer_ids, logits=None, log_probs=None) -> np.ndarray:
    """Next-token loss (nats, float64 [A]) of each answer token from the model's scores at the
    answer positions: `logits` or `log_probs`, each [A, vocab] (row i predicts answer token i)."""
    if (logits is None) == (log_probs is None):
        raise EvaluationError("pass exactly one of logits= or log_probs=")
    answer_ids = np.asarray(answer_ids, dtype=np.int64).reshape(-1)
    scores = np.asarray(logits if logits is not None else log_probs, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] != len(answer_ids):
        raise EvaluationError(f"scores of shape {scores.shape} for {len(answer_ids)} answer "
                              f"tokens; give one row of vocabulary scores per answer token")
    target = scores[np.arange(len(answer_ids)), answer_ids]
    if log_probs is not None:
        return -target
    peak = scores.max(axis=1)
    log_normalizer = peak + np.log(np.exp(scores - peak[:, None]).sum(axis=1))
    return log_normalizer - target


@dataclass
class ExampleResult:
    """One scored example: which gold values were found, optionally its mean answer-token loss
    (nats), the generated text, and (teacher-forced) the argmax token at each answer position."""
    task: str
    length: int
    depth: float
    index: int
    found: tuple[bool, ...]
    answer_loss: Optional[float] = None
    output: Optional[str] = None
    predicted_ids: Optional[tuple[int, ...]] = None

    @property
    def score(self) -> float:
        return sum(self.found) / len(self.found) if self.found else 0.0

    @classmethod
    def of(cls, example, score: RecallScore, answer_loss: Optional[float] = None,
           output: Optional[str] = None, predicted_ids=None) -> "ExampleResult":
        return cls(example.task, example.length, example.depth, example.index, score.found,
                   answer_loss, output,
                   None if predicted_ids is None else tuple(int(t) for t in predicted_ids))


@dataclass
class RecallCell:
    """Mean recall (RULER's metric, in [0, 1]) of `examples` examples of one task, length
    (tokens) and depth (0-1); `answer_loss` is their mean answer-token loss when known."""
    task: str
    length: int
    depth: float
    examples: int
    score: float
    answer_loss: Optional[float] = None
    # Each example's score in index order (for confidence intervals); None in older reports.
    scores: Optional[list[float]] = None


def recall_cells(results: Iterable[ExampleResult]) -> list[RecallCell]:
    """Group per-example results by (task, length, depth), sorted, with mean scores."""
    groups = defaultdict(list)
    for result in results:
        groups[(result.task, result.length, round(float(result.depth), 6))].append(result)
    cells = []
    for (task, length, depth), members in sorted(groups.items()):
        losses = [m.answer_loss for m in members if m.answer_loss is not None]
        cells.append(RecallCell(task, length, depth, len(members),
                                float(np.mean([m.score for m in members])),
                                float(np.mean(losses)) if losses else None,
                                [float(m.score) for m in sorted(members, key=lambda m: m.index)]))
    return cells
