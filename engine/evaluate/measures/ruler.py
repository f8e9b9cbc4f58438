"""RULER's protocol (--protocol ruler): its tasks under their own names, prompts, generation
budgets and metrics (engine.evaluate.ruler), scored by greedy generation.

    python -m engine.evaluate --protocol ruler --tokenizer hf/prolong-64k --hf hf/prolong-64k \\
        --lengths 4096 65536 --samples 100 --ruler-essays PaulGrahamEssays.json \\
        --ruler-squad squad.json --ruler-hotpotqa hotpotqa.json --out eval/ruler

Writes examples.jsonl (one line per example: task, length, index, the prompt's text and token
count, the answer prefix, the gold values, the generation budget, and with a model its output
and score) and, with --hf or --checkpoint, report.json and report.md: per task and length the
mean score (string_match_all, string_match_part for QA) with its 95% confidence interval. Without
a model only the examples are written, for other harnesses. --checkpoint is exported to a
temporary Hugging Face folder (under TMPDIR) and generated with on one device.
"""
from __future__ import annotations

from engine.evaluate.measures import Flag
from engine.evaluate.measures.generated import GeneratedProtocol
from engine.evaluate.ruler import (RULER_TASKS, RulerSources, build_ruler_example,
                                   chat_template_for, clean_prediction, example_score)


class Ruler(GeneratedProtocol):
    name = "ruler"
    protocol = "ruler"
    protocol_description = "RULER's tasks and metrics"
    protocols = ("ruler",)
    order = 40
    asked = "--lengths (RULER's tasks)"
    tasks = RULER_TASKS
    data_flags = (
        Flag("ruler_essays", "--ruler-essays", {"help": "RULER's PaulGrahamEssays.json"}),
        Flag("ruler_squad", "--ruler-squad", {"help": "SQuAD v2 dev set (RULER's squad.json)"}),
        Flag("ruler_hotpotqa", "--ruler-hotpotqa",
             {"help": "HotpotQA distractor dev set (hotpotqa.json)"}),
        Flag("ruler_words", "--ruler-words",
             {"help": "RULER's english_words.json (cwe at long lengths)"}),
        Flag("chat_template", "--chat-template", {
            "action": "store_true", "default": None,
            "help": "wrap each prompt in the tokenizer's chat template (its "
                    "tokenizer_config.json's, or Llama-3's for a tokenizer.model), as RULER "
                    "does for instruct models"}),
    )

    def build(self, section, tokenizer, tasks):
        chat = chat_template_for(tokenizer) if section.chat_template else None
        sources = RulerSources(section.ruler_essays or None, section.ruler_squad or None,
                               section.ruler_hotpotqa or None,
                               words_file=section.ruler_words or None)
        examples = [build_ruler_example(task, tokenizer, length, index, section.seed, sources,
                                        chat)
                    for task in tasks for length in section.lengths
                    for index in range(section.samples)]
        return examples, chat.source if chat else None

    def score(self, example, text):
        output = clean_prediction(text)
        return output, example_score(example.metric, output, example.outputs)


MEASURE = Ruler()
