"""examples.jsonl: every prompt of an evaluation as text, with what each checkpoint made of it, so
a user can read the prompts, check a score by hand, or feed the prompts to another harness.

One JSON line per (checkpoint, example): checkpoint, scoring ("teacher_forced" | "generation"),
task, length, depth, index, prompt (the decoded prompt ids, BOS included as its text),
prompt_tokens, answer_prefix (the end of the prompt the answer continues), gold, found (per gold
value), score (RULER's metric: the fraction found) and output (the generated text; null when
teacher-forced, where the canonical answer is fed and `found` says which values were predicted)
and, teacher-forced, predicted: the text of the argmax token at each answer position (what the
model put where each answer token stood; null when generated).
The mean `score` of the lines of one cell is that cell's score in report.json.
"""
from __future__ import annotations

import json
from typing import Sequence


# Where each task's answer prefix starts in the text after the context (the question's end).
ANSWER_PREFIX_MARKERS = (" The special magic", " Answer:", "Corresponding value:")


def answer_prefix(tail: str) -> str:
    for marker in ANSWER_PREFIX_MARKERS:
        at = tail.rfind(marker)
        if at >= 0:
            return tail[at:]
    return tail


def example_lines(examples: Sequence, reports: Sequence, tokenizer) -> list[dict]:
    """The lines for `examples` (RecallExample) and each report's results (ExampleResult)."""
    lines = []
    for report in reports:
        results = {(r.task, r.length, round(float(r.depth), 6), r.index): r
                   for r in getattr(report, "results", [])}
        for example in examples:
            result = results.get((example.task, example.length, round(float(example.depth), 6),
                                  example.index))
            if result is None:
                continue
            tail = tokenizer.decode([int(t) for t in example.prompt_ids[example.context_span[1]:]])
            lines.append({
                "checkpoint": report.name, "scoring": report.scoring, "task": example.task,
                "length": example.length, "depth": example.depth, "index": example.index,
                "prompt": tokenizer.decode([int(t) for t in example.prompt_ids]),
                "prompt_tokens": int(len(example.prompt_ids)),
                "answer_prefix": answer_prefix(tail), "gold": list(example.gold),
                "found": [bool(f) for f in result.found], "score": result.score,
                "output": result.output,
                "predicted": None if result.predicted_ids is None else tokenizer.decode(
                    list(result.predicted_ids))})
    return lines


def examples_text(examples: Sequence, reports: Sequence, tokenizer) -> str:
    """examples.jsonl's text (published with the report, engine.evaluate.report.write_report)."""
    return "".join(json.dumps(line, ensure_ascii=False) + "\n"
                   for line in example_lines(examples, reports, tokenizer))

