"""--write-examples: examples.jsonl holds every prompt as text with its token count, answer
prefix, gold values and each checkpoint's output (or teacher-forced result), and its per-example
scores average to the report's cells."""
import json
import os
from collections import defaultdict

import pytest

from engine.evaluate.__main__ import main
from tests.engine.evaluate_helpers import LLAMA3_VOCAB, llama3_tokenizer_dir, tiny_llama


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_llama(LLAMA3_VOCAB, seed=0, dtype="float32").save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("scoring", ["generation", "teacher-forced"])
def test_examples_jsonl_round_trips_to_the_report(model, tmp_path, scoring):
    out = tmp_path / "out"
    tokenizer = os.path.join(llama3_tokenizer_dir(), "tokenizer.model")
    assert main(["--hf", f"tiny={model}", "--tokenizer", tokenizer, "--tasks", "niah_single",
                 "json_kv", "--lengths", "384", "--depths", "2", "--samples", "2",
                 "--hf-scoring", scoring, "--no-progress", "--write-examples",
                 "--out", str(out)]) == 0
    lines = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 2 * 2
    cells = json.loads((out / "report.json").read_text())["checkpoints"][0]["recall"]["cells"]
    by_cell = defaultdict(list)
    for line in lines:
        assert line["checkpoint"] == "tiny" and line["prompt_tokens"] == 384
        assert line["scoring"] == scoring.replace("-", "_")
        assert line["prompt"].startswith("<|begin_of_text|>")
        assert line["prompt"].endswith(line["answer_prefix"])
        assert line["answer_prefix"].startswith(
            " The special magic number" if line["task"] == "niah_single" else
            "Corresponding value:")
        assert (line["output"] is None) == (scoring == "teacher-forced")
        assert (line["predicted"] is None) == (scoring == "generation")
        assert line["score"] == sum(line["found"]) / len(line["gold"])
        by_cell[(line["task"], line["depth"])].append(line["score"])
    assert len(cells) == len(by_cell) == 4
    for cell in cells:
        scores = by_cell[(cell["task"], cell["depth"])]
        assert cell["score"] == pytest.approx(sum(scores) / len(scores))
        assert cell["scores"] == scores
