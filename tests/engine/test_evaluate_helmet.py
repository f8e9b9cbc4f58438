"""HELMET's Recall tasks: prompts against ones written out by hand from HELMET's published
templates (data.py: load_json_kv, load_ruler) for the same rows of data files in the release's
format, HELMET's row selection and context truncation, and its metrics."""
import json
import os

import numpy as np
import pytest

from engine.evaluate.errors import EvaluationError
from engine.evaluate.helmet import helmet_score, load_helmet_examples, normalize_answer


@pytest.fixture(scope="module")
def tokenizer():
    from data_tools.tokenizer import load_tokenizer
    from tests.engine.evaluate_helpers import llama3_tokenizer_dir

    return load_tokenizer(os.path.join(llama3_tokenizer_dir(), "tokenizer.model"))


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("helmet") / "data"
    kv = [{"context": "JSON data:\n{" + f'"k{i}a": "v{i}a", "k{i}b": "v{i}b"' + "}",
           "question": f'"k{i}a"', "answer": f"v{i}a", "num_kvs": 2,
           "demos": [["\"d1\"", "\"e1\""], ["\"d2\"", "\"e2\""], ["\"d3\"", "\"e3\""]]}
          for i in range(5)]
    _write(root / "json_kv" / "test_k105_dep6.jsonl", kv)
    haystack = "\n".join(["The grass is green. The sky is blue."] * 3000)
    mk = [{"context": haystack + f"\nOne of the special magic numbers for key-{i} is: {i}000001.",
           "query": f"key-{i}", "type_needle_v": "number", "outputs": [f"{i}000001"]}
          for i in range(4)]
    _write(root / "ruler" / "niah_multikey_2" / "validation_8192.jsonl", mk)
    mv = [{"context": "Some text.", "query": "key-x", "type_needle_v": "numbers",
           "outputs": ["1", "2", "3", "4"]}]
    _write(root / "ruler" / "niah_multivalue" / "validation_8192.jsonl", mv)
    return str(root), kv, mk


def test_json_kv_prompt_is_helmets_with_two_demonstrations(tokenizer, data):
    root, rows, _ = data
    examples = load_helmet_examples("json_kv", root, 8192, 3, tokenizer)
    chosen = [int(i) for i in np.random.default_rng(42).permutation(5)[:3]]
    assert [e.index for e in examples] == chosen
    row = rows[chosen[0]]
    expected = (row["context"] + "\n\nExtract the value corresponding to the specified key in "
                "the JSON object below.\n\nKey: \"d1\"\nCorresponding value: \"e1\"\n\nKey: "
                "\"d2\"\nCorresponding value: \"e2\"\n\nKey: " + row["question"]
                + "\nCorresponding value:")
    assert examples[0].prompt == expected
    assert examples[0].prompt_tokens == 1 + len(tokenizer.encode(expected))  # BOS counted
    assert examples[0].tokens_to_generate == 100 and examples[0].outputs == [row["answer"]]


def test_niah_prompt_and_truncation_are_helmets(tokenizer, data):
    root, _, rows = data
    examples = load_helmet_examples("niah_mk_2", root, 8192, 2, tokenizer)
    for example in examples:
        row = rows[example.index]
        assert example.prompt.startswith(
            "A special magic number is hidden within the following text. Make sure to memorize "
            "it. I will quiz you about the number afterwards.\nThe grass is green.")
        assert example.prompt.endswith(
            f"\nWhat is the special magic number for {row['query']} mentioned in the provided "
            f"text?\nThe special magic number for {row['query']} mentioned in the provided text is")
        # ~30K tokens of context cut from its end to fit 8192 - 50 with BOS; as in HELMET, the
        # cut prompt is not re-checked, and re-tokenizing its joint may move it by a token.
        assert example.truncated_tokens > 20000
        assert abs(example.prompt_tokens - (8192 - 50)) <= 2
        assert "One of the special magic" not in example.prompt  # the needle was at the end


def test_helmet_metrics():
    assert helmet_score("substring_exact_match", "The value is: V1A.", ["v1a"]) == 1.0
    assert helmet_score("substring_exact_match", "Corresponding value: the  answer", ["answer"]) == 1.0
    assert helmet_score("substring_exact_match", "nothing", ["v1a"]) == 0.0
    assert helmet_score("ruler_recall", "1, 2 and 9", ["1", "2", "3", "4"]) == 0.5
    assert normalize_answer("The  Big, Apple!") == "big apple"


def test_bad_helmet_data(tokenizer, data, tmp_path):
    root, _, _ = data
    with pytest.raises(EvaluationError, match="download_data.sh"):
        load_helmet_examples("niah_mk_3", root, 8192, 1, tokenizer)
    bad = tmp_path / "data" / "ruler" / "niah_multikey_2" / "validation_8192.jsonl"
    _write(bad, [{"input": "x", "outputs": ["1"]}])
    with pytest.raises(EvaluationError, match=r"lacks \['context', 'query', 'type_needle_v'\]"):
        load_helmet_examples("niah_mk_2", str(tmp_path / "data"), 8192, 1, tokenizer)
    with pytest.raises(EvaluationError, match="unknown HELMET recall task 'niah_mk_1'"):
        load_helmet_examples("niah_mk_1", root, 8192, 1, tokenizer)
