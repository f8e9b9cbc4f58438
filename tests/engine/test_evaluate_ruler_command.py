"""python -m engine.evaluate --protocol ruler: examples.jsonl for other harnesses, greedy
generation of a Hugging Face folder scored by RULER's metric with 95% intervals, and bad input
that exits 2 with nothing written."""
import json
import os

import pytest

from engine.evaluate.__main__ import main
from engine.evaluate.ruler import example_score
from tests.engine.evaluate_helpers import LLAMA3_VOCAB, llama3_tokenizer_dir, tiny_llama


@pytest.fixture(scope="module")
def tokenizer_path():
    return os.path.join(llama3_tokenizer_dir(), "tokenizer.model")


def _rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_examples_only(tokenizer_path, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--protocol", "ruler", "--tokenizer", tokenizer_path, "--tasks", "niah_single_1",
                 "vt", "--lengths", "4096", "--samples", "2", "--out", str(out)]) == 0
    rows = _rows(out / "examples.jsonl")
    assert [(r["task"], r["index"]) for r in rows] == [("niah_single_1", 0), ("niah_single_1", 1),
                                                       ("vt", 0), ("vt", 1)]
    assert all(r["prompt_tokens"] + r["tokens_to_generate"] <= 4096 for r in rows)
    assert not (out / "report.json").exists()


def test_generated_report_round_trips_to_the_examples(tokenizer_path, tmp_path):
    model = tmp_path / "tiny"
    tiny_llama(LLAMA3_VOCAB, seed=0, dtype="float32").save_pretrained(str(model))
    out = tmp_path / "out"
    assert main(["--protocol=ruler", "--tokenizer", tokenizer_path, "--hf", str(model),
                 "--tasks", "niah_single_1", "--lengths", "1024", "--samples", "2",
                 "--out", str(out)]) == 0
    rows = _rows(out / "examples.jsonl")
    report = json.load(open(out / "report.json"))["cells"]
    assert len(report) == 1 and report[0]["samples"] == 2
    cell = report[0]
    assert cell["scoring"] == "generated" and cell["generation_budget"] == 128
    rescored = [example_score(r["metric"], r["output"], r["outputs"]) for r in rows]
    assert cell["score"] == pytest.approx(sum(rescored) / 2)
    assert cell["ci_method"] == "wilson" and 0 <= cell["ci95"][0] <= cell["ci95"][1] <= 1
    assert "| niah_single_1 | 1024 |" in (out / "report.md").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--protocol", "helmet"], "unknown --protocol 'helmet'; choose from ours, ruler, "
                               "helmet-recall (ours: this suite at exact lengths and depths; "
                               "ruler: RULER's tasks and metrics; helmet-recall: HELMET's "
                               "Recall tasks on its data)"),
    (["--protocol", "helmet-recall", "--tasks", "json_kv"], "needs --helmet-data"),
    (["--protocol", "helmet-recall", "--tasks", "json_kv", "--helmet-data", "nowhere",
      "--lengths", "8192"], "download_data.sh"),
    (["--protocol", "helmet-recall", "--tasks", "json_kv", "--helmet-data", "d", "--lengths",
      "5000"], "json_kv has files for lengths"),
    (["--protocol", "ruler", "--tasks", "niah_single"], "unknown ruler task 'niah_single'"),
    (["--protocol", "ruler", "--tasks", "niah_single_2"], "download_paulgraham_essay.py"),
    (["--protocol", "ruler", "--tasks", "niah_single_1", "--lengths", "200"],
     "too short for RULER's niah_single_1"),
])
def test_bad_input_exits_2_and_writes_nothing(tokenizer_path, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    argv = ["--tokenizer", tokenizer_path, "--out", str(out)] + extra
    if "--lengths" not in argv:
        argv += ["--lengths", "4096"]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_an_engine_checkpoint_generates_what_its_hugging_face_source_generates(
        tokenizer_path, tmp_path, monkeypatch):
    import tempfile

    from tests.engine.test_convert_layouts import convert_cli, random_hf_llama

    random_hf_llama(tmp_path / "hf", vocab_size=LLAMA3_VOCAB, max_shard_size="50MB")
    assert convert_cli("import", "--hf", str(tmp_path / "hf"), "--out",
                       str(tmp_path / "ckpt")).returncode == 0
    # The export goes under TMPDIR and is gone afterwards.
    exports = tmp_path / "tmp"
    exports.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(exports))
    common = ["--protocol", "ruler", "--tokenizer", tokenizer_path, "--tasks", "niah_single_1",
              "--lengths", "512", "--samples", "2"]
    assert main([*common, "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "from_hf")]) == 0
    assert main([*common, "--checkpoint", str(tmp_path / "ckpt"), "--export-dtype", "float32",
                 "--out", str(tmp_path / "from_ckpt")]) == 0
    assert list(exports.iterdir()) == []
    from_hf, from_ckpt = _rows(tmp_path / "from_hf" / "examples.jsonl"), _rows(
        tmp_path / "from_ckpt" / "examples.jsonl")
    # An fp32 import and export round trip: the same greedy outputs, token for token.
    assert [r["output"] for r in from_ckpt] == [r["output"] for r in from_hf]
    assert all(r["output"] for r in from_ckpt)
    assert [r["score"] for r in from_ckpt] == [r["score"] for r in from_hf]
    report = json.loads((tmp_path / "from_ckpt" / "report.json").read_text())
    assert report["exported_from_checkpoint"] is True
    assert [c["scoring"] for c in report["cells"]] == ["generated"]
    # Bad input: no checkpoint there, or both a folder and a checkpoint.
    assert main([*common, "--checkpoint", str(tmp_path / "nothing"), "--out",
                 str(tmp_path / "bad")]) == 2
    assert main([*common, "--checkpoint", str(tmp_path / "ckpt"), "--hf", str(tmp_path / "hf"),
                 "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists() and list(exports.iterdir()) == []
