"""HELMET's Recall category (Princeton, arXiv 2410.02694): json_kv, niah_mk_2, niah_mk_3 and
niah_mv, prompted and scored as HELMET's data.py and model_utils.py do, on the data files of
HELMET's own release (scripts/download_data.sh), which a user downloads beforehand.

    examples = load_helmet_examples("niah_mk_2", "data", length=65536, samples=100,
                                    tokenizer=tokenizer)
    helmet_score(example.metric, output, example.outputs)

What matches HELMET (configs/recall.yaml and recall_short.yaml, use_chat_template false):
- Files: data/ruler/{niah_multikey_2,niah_multikey_3,niah_multivalue}/validation_{L}.jsonl
  and data/json_kv/test_k{pairs}_dep6.jsonl with 105, 220, 440, 900, 1800 pairs at 8K, 16K, 32K,
  64K, 128K.
- Prompts: json_kv "{context}\\n\\nExtract the value corresponding to the specified key in the
  JSON object below.\\n\\n{demos}Key: {question}\\nCorresponding value:" with 2 demonstrations
  "Key: {key}\\nCorresponding value: {value}" joined by blank lines (the JSON context first);
  the needle tasks RULER's templates with the answer prefix after a newline ("...text?\\nThe
  special magic ... is").
- Selection: max_test_samples 100 after the `datasets` library's shuffle(seed=42) (the rows of
  numpy's default_rng(42).permutation of the file).
- Length: the prompt tokenized with BOS; when it exceeds input_max_length - generation budget,
  the context loses that many tokens from its end (HELMET's truncation; as there, the cut
  prompt is not counted again, and re-tokenizing the joint may add or save a token).
- Budgets: 50 tokens for niah_mk_2 and niah_mv, 100 for niah_mk_3 and json_kv; greedy.
- Metrics: json_kv substring exact match after SQuAD normalisation (lower case, no
  punctuation, no articles, single spaces), the better of the raw output and the text after
  "Corresponding value:"; the needle tasks HELMET's ruler_recall (the fraction of gold strings
  found in the output, case-insensitive).
"""
from __future__ import annotations

import json
import os
import re
import string
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from data_tools.tokenizer import TextTokenizer
from engine.evaluate.errors import EvaluationError

JSON_KV_PAIRS = {8192: 105, 16384: 220, 32768: 440, 65536: 900, 131072: 1800}
RULER_FOLDERS = {"niah_mk_2": "niah_multikey_2", "niah_mk_3": "niah_multikey_3",
                 "niah_mv": "niah_multivalue"}
HELMET_RECALL_TASKS = ("json_kv", "niah_mk_2", "niah_mk_3", "niah_mv")
GENERATION_BUDGET = {"json_kv": 100, "niah_mk_2": 50, "niah_mk_3": 100, "niah_mv": 50}
SAMPLES = 100
SHOTS = 2
SEED = 42
DOWNLOAD_HELP = ("HELMET's data: run princeton-nlp/HELMET's scripts/download_data.sh (it "
                 "unpacks data/) and pass that data folder with --helmet-data")

JSON_KV_USER = ("{context}\n\nExtract the value corresponding to the specified key in the JSON "
                "object below.\n\n{demos}Key: {question}")
JSON_KV_SYSTEM = "Corresponding value:"
JSON_KV_DEMO = "Key: {key}\nCorresponding value:{value}"
NIAH_SINGLE_USER = (
    "A special magic {type_needle_v} is hidden within the following text. Make sure to memorize "
    "it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat is the special "
    "magic {type_needle_v} for {query} mentioned in the provided text?")
NIAH_SINGLE_SYSTEM = ("The special magic {type_needle_v} for {query} mentioned in the provided "
                      "text is")
NIAH_MANY_USER = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to "
    "memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are "
    "all the special magic {type_needle_v} for {query} mentioned in the provided text?")
NIAH_MANY_SYSTEM = ("The special magic {type_needle_v} for {query} mentioned in the provided "
                    "text are")


@dataclass
class HelmetExample:
    task: str
    length: int
    index: int                  # row of the data file
    input: str                  # the user part
    answer_prefix: str          # "\n" + the system part: the prompt ends with it
    outputs: list[str]
    tokens_to_generate: int
    prompt_tokens: int          # with BOS, as HELMET tokenizes
    truncated_tokens: int       # context tokens HELMET's truncation removed
    metric: str

    @property
    def prompt(self) -> str:
        return self.input + self.answer_prefix


def helmet_data_file(data_root: str, task: str, length: int) -> str:
    if task == "json_kv":
        if length not in JSON_KV_PAIRS:
            raise EvaluationError(
                f"HELMET's json_kv has files for lengths {sorted(JSON_KV_PAIRS)} only, not "
                f"{length}; pick those lengths")
        return os.path.join(data_root, "json_kv", f"test_k{JSON_KV_PAIRS[length]}_dep6.jsonl")
    return os.path.join(data_root, "ruler", RULER_FOLDERS[task], f"validation_{length}.jsonl")


def _read_rows(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise EvaluationError(f"{path} does not exist: {DOWNLOAD_HELP}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise EvaluationError(f"{path}:{number}: not a JSON line ({error}); expected "
                                          f"{DOWNLOAD_HELP}") from None
    if not rows:
        raise EvaluationError(f"{path} holds no example; expected {DOWNLOAD_HELP}")
    return rows


def selected_rows(count: int, samples: int, seed: int = SEED) -> list[int]:
    """The rows HELMET evaluates: datasets' shuffle(seed) is numpy's default_rng(seed)
    permutation; then the first `samples`."""
    return [int(i) for i in np.random.default_rng(seed).permutation(count)[:samples]]


def _fields(task: str, row: dict, path: str) -> dict:
    need = (("context", "question", "answer", "demos") if task == "json_kv"
            else ("context", "query", "type_needle_v"))
    missing = [k for k in need if k not in row]
    if task != "json_kv" and "outputs" not in row and "answer" not in row:
        missing.append("outputs")
    if missing:
        raise EvaluationError(f"{path}: a row lacks {missing}: not HELMET's {task} data; "
                              f"expected {DOWNLOAD_HELP}")
    return row


def prompt_parts(task: str, row: dict) -> tuple[str, str]:
    """(user text, "\\n" + system text) of HELMET's prompt_template for one data row."""
    if task == "json_kv":
        demos = "\n\n".join(JSON_KV_DEMO.format(key=key, value=" " + value)
                            for key, value in row["demos"][:SHOTS])
        demos += "\n\n" if SHOTS > 0 else ""
        return (JSON_KV_USER.format(context=row["context"], demos=demos,
                                    question=row["question"]), "\n" + JSON_KV_SYSTEM)
    user, system = ((NIAH_MANY_USER, NIAH_MANY_SYSTEM) if task == "niah_mv"
                    else (NIAH_SINGLE_USER, NIAH_SINGLE_SYSTEM))
    values = {"context": row["context"], "query": row["query"],
              "type_needle_v": row["type_needle_v"]}
    return user.format(**values), "\n" + system.format(**values)


def load_helmet_examples(task: str, data_root: str, length: int, samples: int,
                         tokenizer: TextTokenizer) -> list[HelmetExample]:
    if task not in HELMET_RECALL_TASKS:
        raise EvaluationError(f"unknown HELMET recall task {task!r}; choose from "
                              f"{', '.join(HELMET_RECALL_TASKS)}")
    path = helmet_data_file(data_root, task, length)
    rows = _read_rows(path)
    budget = GENERATION_BUDGET[task]
    bos = 1 if tokenizer.bos_id is not None else 0
    examples = []
    for index in selected_rows(len(rows), samples):
        row = dict(_fields(task, rows[index], path))
        user, system = prompt_parts(task, row)
        tokens = bos + len(tokenizer.encode(user + system))
        over = tokens - (length - budget)
        truncated = 0
        if over > 0:
            context_ids = tokenizer.encode(row["context"])
            if over >= len(context_ids):
                raise EvaluationError(f"length {length} is too short for HELMET's {task}: "
                                      f"even without its context the prompt and {budget} "
                                      f"generated tokens do not fit")
            # The context keeps its first len - over tokens, cut at a token boundary.
            row["context"] = row["context"][:len(tokenizer.decode(context_ids[:-over]))]
            user, system = prompt_parts(task, row)
            tokens, truncated = bos + len(tokenizer.encode(user + system)), over
        answers = row["answer"] if task == "json_kv" else row.get("outputs", row.get("answer"))
        answers = [answers] if isinstance(answers, str) else list(answers)
        examples.append(HelmetExample(
            task, length, index, user, system, answers, budget, tokens, truncated,
            "substring_exact_match" if task == "json_kv" else "ruler_recall"))
    return examples


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, punctuation removed, articles removed, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def parse_output(output: str, prefix: str) -> str:
    """The text after `prefix` on its line (else the first line), `prefix` stripped again."""
    for pattern in (re.compile(f"(?:{re.escape(prefix)})(.*)(?:\n|$)", re.IGNORECASE),
                    re.compile(r"(?:^)(.*)(?:\n|$)")):
        match = pattern.search(output)
        if match is not None:
            return re.sub(f"^{re.escape(prefix)}", "", match[1].strip(), flags=re.IGNORECASE).strip()
    return ""


def helmet_score(metric: str, output: str, answers: Sequence[str]) -> float:
    """One example's HELMET score in [0, 1]."""
    if metric == "substring_exact_match":
        def best(prediction):
            return max(float(normalize_answer(a) in normalize_answer(prediction)) for a in answers)
        return max(best(output), best(parse_output(output, "corresponding value:")))
    return sum(a.lower() in output.lower() for a in answers) / len(answers)
