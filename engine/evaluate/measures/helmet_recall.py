"""HELMET's Recall (--protocol helmet-recall): json_kv and RULER's multi-key/multi-value needles
on HELMET's data files, with its prompts, truncation, budgets and metrics
(engine.evaluate.helmet), scored by greedy generation.

    python -m engine.evaluate --protocol helmet-recall --tokenizer hf/prolong-64k \\
        --hf hf/prolong-64k --lengths 8192 65536 --helmet-data HELMET/data --out eval/helmet

Writes examples.jsonl and, with --hf or --checkpoint, report.json and report.md as --protocol
ruler does: per task and length the mean score (substring exact match for json_kv, ruler_recall
for the needles) with its 95% confidence interval.
"""
from __future__ import annotations

from engine.evaluate.errors import EvaluationError
from engine.evaluate.helmet import HELMET_RECALL_TASKS, helmet_score, load_helmet_examples
from engine.evaluate.measures import Flag
from engine.evaluate.measures.generated import GeneratedProtocol

HELMET_HELP = ("run princeton-nlp/HELMET's scripts/download_data.sh beforehand and pass its data "
               "folder")


class HelmetRecall(GeneratedProtocol):
    name = "helmet_recall"
    protocol = "helmet-recall"
    protocol_description = "HELMET's Recall tasks on its data"
    protocols = ("helmet-recall",)
    order = 50
    asked = "--lengths (HELMET's Recall tasks)"
    tasks = HELMET_RECALL_TASKS
    data_flags = (
        Flag("helmet_data", "--helmet-data",
             {"help": "HELMET's data folder (scripts/download_data.sh)"}),
        # Taken to say why it does not apply, rather than to fail as an unknown option.
        Flag("chat_template", "--chat-template", {"action": "store_true", "default": None,
                                                  "help": "not for helmet-recall"}),
    )

    def build(self, section, tokenizer, tasks):
        if section.chat_template:
            raise EvaluationError("--chat-template: HELMET's recall configs set "
                                  "use_chat_template false; drop it for helmet-recall")
        if not section.helmet_data:
            raise EvaluationError(f"--protocol helmet-recall needs --helmet-data: {HELMET_HELP}")
        examples = [e for task in tasks for length in section.lengths
                    for e in load_helmet_examples(task, section.helmet_data, length,
                                                  section.samples, tokenizer)]
        return examples, None

    def score(self, example, text):
        return text, helmet_score(example.metric, text, example.outputs)  # as generated


MEASURE = HelmetRecall()
