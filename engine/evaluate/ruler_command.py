"""python -m engine.evaluate --protocol ruler | helmet-recall: RULER's tasks (engine.evaluate.ruler)
or HELMET's Recall tasks (engine.evaluate.helmet) with their prompts, budgets and metrics, scored
by greedy generation of a Hugging Face folder.

    python -m engine.evaluate --protocol ruler --tokenizer hf/prolong-64k --hf hf/prolong-64k \\
        --lengths 4096 65536 --samples 100 --ruler-essays PaulGrahamEssays.json \\
        --ruler-squad squad.json --ruler-hotpotqa hotpotqa.json --out eval/ruler
    python -m engine.evaluate --protocol helmet-recall --tokenizer hf/prolong-64k \\
        --hf hf/prolong-64k --lengths 8192 65536 --helmet-data HELMET/data --out eval/helmet

Writes examples.jsonl (one line per example: task, length, index, the prompt's text and token
count, the answer prefix, the gold values, the generation budget, and with --hf the model's
output and score) and, with --hf, report.json and report.md: per task and length the mean score
(RULER's string_match_all, string_match_part for QA; HELMET's substring exact match for json_kv
and ruler_recall for the needles) with its 95% confidence interval, always "generated" with the
task's budget. Without --hf only the examples are written, for other
harnesses. --checkpoint scores an engine checkpoint the same way: it is exported to a temporary
Hugging Face folder (engine.convert export, under TMPDIR) and generated with on one device, so
only lengths that fit one device. Bad input (an unknown task, a missing or malformed haystack file, a length too short
for a task's budget) exits with code 2 before anything is written.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

from data_tools.tokenizer import TokenizerError, load_tokenizer
from engine.checkpoint import CheckpointError, read_checkpoint_state, resolve_checkpoint
from engine.convert.export import export_checkpoint
from engine.evaluate.errors import EvaluationError
from engine.evaluate.hf_model import greedy_generate, load_hf_model
from engine.evaluate.inputs import check_recorded_tokenizers, folder_tokenizer
from engine.evaluate.report import check_report_folder, publish_text_report
from engine.evaluate.helmet import helmet_score, load_helmet_examples
from engine.evaluate.measures import PROTOCOL_TASKS
from engine.evaluate.ruler import (RulerSources, build_ruler_example,
                                   chat_template_for, clean_prediction, encode_prompt,
                                   example_score)
from engine.evaluate.statistics import confidence_interval

# RULER and lm-evaluation-harness score 500 examples per task and length; 100 keeps the 95%
# interval of an exact-match score within about +-0.1.
DEFAULT_SAMPLES = 100
HELMET_HELP = ("run princeton-nlp/HELMET's scripts/download_data.sh beforehand and pass its data "
               "folder")


def _parser(protocol: str) -> argparse.ArgumentParser:
    tasks = PROTOCOL_TASKS[protocol]
    parser = argparse.ArgumentParser(
        prog=f"python -m engine.evaluate --protocol {protocol}", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--tokenizer", required=True, help="the model's tokenizer")
    parser.add_argument("--hf", help="Hugging Face folder to generate with (else: examples only)")
    parser.add_argument("--checkpoint", help="engine checkpoint to generate with, through a "
                                             "temporary Hugging Face export (one device)")
    parser.add_argument("--export-dtype", default="bfloat16",
                        choices=("bfloat16", "float16", "float32"),
                        help="the temporary export's dtype (--checkpoint; default bfloat16)")
    parser.add_argument("--out", required=True, help="folder for examples.jsonl and the report")
    parser.add_argument("--tasks", nargs="+", default=list(tasks), metavar="TASK",
                        help=f"default: all of {', '.join(tasks)}")
    parser.add_argument("--lengths", nargs="+", type=int, required=True)
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                        help=f"examples per task and length (default {DEFAULT_SAMPLES})")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--ruler-essays", help="RULER's PaulGrahamEssays.json")
    parser.add_argument("--ruler-squad", help="SQuAD v2 dev set (RULER's squad.json)")
    parser.add_argument("--ruler-hotpotqa", help="HotpotQA distractor dev set (hotpotqa.json)")
    parser.add_argument("--ruler-words", help="RULER's english_words.json (cwe at long lengths)")
    parser.add_argument("--chat-template", action="store_true",
                        help="ruler: wrap each prompt in the tokenizer's chat template (its "
                             "tokenizer_config.json's, or Llama-3's for a tokenizer.model), as "
                             "RULER does for instruct models")
    parser.add_argument("--helmet-data", help="HELMET's data folder (scripts/download_data.sh)")
    return parser


def main(argv=None, protocol: str = "ruler") -> int:
    args = _parser(protocol).parse_args(argv)
    tasks = PROTOCOL_TASKS[protocol]
    export_dir = None
    try:
        check_report_folder(args.out)
        unknown = [t for t in args.tasks if t not in tasks]
        if unknown:
            raise EvaluationError(f"unknown {protocol} task {unknown[0]!r}; choose from "
                                  f"{', '.join(tasks)}")
        if args.samples < 1:
            raise EvaluationError(f"--samples {args.samples}; give at least 1")
        if args.hf and args.checkpoint:
            raise EvaluationError("give --hf or --checkpoint, not both: one model per run")
        tokenizer = load_tokenizer(args.tokenizer)
        # The prompts' ids must be the model's: a tokenizer of other ids is refused, naming both.
        check_recorded_tokenizers(_model_tokenizer(args),
                                  {f"--tokenizer {args.tokenizer}": tokenizer.describe()},
                                  trained="was trained with" if args.checkpoint else "ships")
        # Every prompt is built before a model is loaded or a file written.
        chat = None
        if args.chat_template:
            if protocol != "ruler":
                raise EvaluationError("--chat-template: HELMET's recall configs set "
                                      "use_chat_template false; drop it for helmet-recall")
            chat = chat_template_for(tokenizer)
        if protocol == "ruler":
            sources = RulerSources(args.ruler_essays, args.ruler_squad, args.ruler_hotpotqa,
                                   words_file=args.ruler_words)
            examples = [build_ruler_example(task, tokenizer, length, index, args.seed, sources,
                                            chat)
                        for task in args.tasks for length in args.lengths
                        for index in range(args.samples)]
        else:
            if not args.helmet_data:
                raise EvaluationError(f"--protocol helmet-recall needs --helmet-data: "
                                      f"{HELMET_HELP}")
            examples = [e for task in args.tasks for length in args.lengths
                        for e in load_helmet_examples(task, args.helmet_data, length,
                                                      args.samples, tokenizer)]
        model = None
        if args.checkpoint:
            export_dir = tempfile.mkdtemp(prefix="engine-export-")
            model = _exported_model(args.checkpoint, export_dir, args.export_dtype)
        elif args.hf:
            model = load_hf_model(args.hf)
    except (EvaluationError, TokenizerError, CheckpointError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    finally:
        # The weights are in memory once loaded: the exported folder is not needed again.
        if export_dir is not None:
            shutil.rmtree(export_dir, ignore_errors=True)
    rows = [dict(_row(e, protocol), chat_template=chat.source if chat else None)
            for e in examples]
    if model is not None:
        bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        for example, row in zip(examples, rows):
            # RULER's Hugging Face client tokenizes input + answer prefix with the model's
            # tokenizer, which puts BOS first (once: a chat template's own BOS is kept alone).
            ids = encode_prompt(tokenizer, example.prompt)
            ids = ids if ids[:1] == bos else bos + ids
            new = greedy_generate(model, [ids], example.tokens_to_generate)[0]
            text = tokenizer.decode([int(t) for t in new])
            if protocol == "ruler":
                row["output"] = clean_prediction(text)
                row["score"] = example_score(example.metric, row["output"], example.outputs)
            else:  # HELMET scores the output as generated
                row["output"] = text
                row["score"] = helmet_score(example.metric, text, example.outputs)
    files = {"examples.jsonl": "".join(json.dumps(row, ensure_ascii=False) + "\n"
                                       for row in rows)}
    if model is not None:
        report = report_from_rows(rows)
        files["report.json"] = json.dumps(
            {"protocol": protocol, "model": args.hf or args.checkpoint,
             "exported_from_checkpoint": bool(args.checkpoint), "seed": args.seed,
             "cells": report}, indent=2)
        files["report.md"] = report_markdown(report, protocol)
    # Published whole, as engine.evaluate's report: a kill leaves the previous folder or none.
    publish_text_report(args.out, files)
    print(f"wrote {len(rows)} examples to {args.out}", flush=True)
    return 0


def _model_tokenizer(args) -> dict:
    """{the model as the user named it: the record of its tokenizer}: what the engine checkpoint
    recorded, or the Hugging Face folder's own tokenizer files; None where there is none."""
    if args.checkpoint:
        state = read_checkpoint_state(resolve_checkpoint(args.checkpoint))
        return {f"--checkpoint {args.checkpoint}": state.get("tokenizer")}
    return {f"--hf {args.hf}": folder_tokenizer(args.hf)} if args.hf else {}


def _exported_model(checkpoint: str, folder: str, dtype: str):
    """The engine checkpoint as a transformers model, through an export into `folder`."""
    export_checkpoint(checkpoint, os.path.join(folder, "hf"), dtype=dtype,
                      log=lambda message: print(message, flush=True))
    return load_hf_model(os.path.join(folder, "hf"))


def _row(example, protocol: str) -> dict:
    return {"protocol": protocol, "task": example.task, "length": example.length,
            "index": example.index, "input": example.input,
            "answer_prefix": example.answer_prefix, "prompt_tokens": example.prompt_tokens,
            "outputs": example.outputs, "tokens_to_generate": example.tokens_to_generate,
            "metric": example.metric, "scoring": "generated"}


def report_from_rows(rows) -> list[dict]:
    """Per (task, length): mean score, its 95% interval and how it was scored."""
    cells: dict[tuple, list] = {}
    for row in rows:
        cells.setdefault((row["task"], row["length"]), []).append(row)
    report = []
    for (task, length), members in cells.items():
        interval = confidence_interval([r["score"] for r in members])
        report.append({"task": task, "length": length, "samples": len(members),
                       "score": interval.mean, "ci95": [interval.low, interval.high],
                       "ci_method": interval.method, "metric": members[0]["metric"],
                       "scoring": "generated",
                       "generation_budget": members[0]["tokens_to_generate"]})
    return report


def report_markdown(report, protocol: str = "ruler") -> str:
    lines = [f"# Recall (protocol: {protocol})", "",
             "| task | length | score | 95% CI | samples | scoring | budget |",
             "|---|---|---|---|---|---|---|"]
    for c in report:
        lines.append(f"| {c['task']} | {c['length']} | {100 * c['score']:.1f} | "
                     f"[{100 * c['ci95'][0]:.1f}, {100 * c['ci95'][1]:.1f}] ({c['ci_method']}) | "
                     f"{c['samples']} | {c['scoring']} | {c['generation_budget']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
