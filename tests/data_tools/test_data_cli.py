"""The lce-data command line, run the way the README's quickstart runs it."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_tools.cli import main
from data_tools.indexed import IndexedReader
from data_tools.packed import PackedDataset
from data_tools_helpers import write_recipe

REPO = os.path.join(os.path.dirname(__file__), "..", "..")
SAMPLE = os.path.join(REPO, "data_tools", "sample")


def test_module_entry_point_help_lists_every_subcommand():
    result = subprocess.run([sys.executable, "-m", "data_tools", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in ("preprocess", "import-mds", "merge", "stats", "inspect", "mix", "pack", "sft"):
        assert command in result.stdout


@pytest.mark.parametrize("command", ["preprocess", "import-mds", "merge", "stats", "inspect",
                                     "mix", "sft"])
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and "usage: lce-data " + command in capsys.readouterr().out


def test_quickstart_pipeline(tmp_path, capsys, llama3_model):
    out = str(tmp_path)
    assert main(["preprocess", "--input", os.path.join(SAMPLE, "code.jsonl.zst"), "--output-prefix",
                 f"{out}/code", "--tokenizer", llama3_model, "--group-by", "repo", "--quiet",
                 "--workers", "2"]) == 0
    assert main(["preprocess", "--input", os.path.join(SAMPLE, "docs.jsonl.gz"), "--output-prefix",
                 f"{out}/docs", "--tokenizer", llama3_model, "--quiet"]) == 0
    summary = json.load(open(f"{out}/code.summary.json"))
    assert summary["documents"] == 18 and summary["skipped_lines"] == 0
    assert summary["tokens"] == IndexedReader(f"{out}/code").num_tokens

    recipe = write_recipe(tmp_path / "r.yaml", 4096, [
        {"name": "code", "path": "code", "weight": 0.6, "long": True},
        {"name": "docs", "path": "docs", "weight": 0.4}])
    assert main(["mix", recipe, "--output", f"{out}/packed", "--data-root", out]) == 0
    assert "sequences x 4,096 tokens" in capsys.readouterr().out
    ds = PackedDataset(f"{out}/packed")
    assert len(ds) > 10 and all(ds[i].doc_lengths.sum() == 4096 for i in range(len(ds)))
    assert main(["pack", recipe, "--output", f"{out}/packed", "--data-root", out]) == 0
    assert "reusing the packed index" in capsys.readouterr().out

    assert main(["stats", f"{out}/docs", "--png", f"{out}/h.png"]) == 0
    table = capsys.readouterr().out
    assert "79 documents" in table and "% tokens" in table
    with open(f"{out}/h.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    assert main(["inspect", f"{out}/docs", "0"]) == 0
    doc = json.loads(capsys.readouterr().out)
    first = json.loads(__import__("gzip").open(os.path.join(SAMPLE, "docs.jsonl.gz")).readline())
    assert doc["text"].startswith(first["text"][:100])
    assert main(["inspect", f"{out}/packed", "1"]) == 0
    sequence = json.loads(capsys.readouterr().out)
    assert sum(sequence["doc_lengths"]) == 4096 and len(sequence["pieces"]) == len(
        sequence["doc_lengths"])

    assert main(["merge", "--output-prefix", f"{out}/all", f"{out}/code", f"{out}/docs"]) == 0
    merged = IndexedReader(f"{out}/all")
    code, docs = IndexedReader(f"{out}/code"), IndexedReader(f"{out}/docs")
    assert len(merged) == len(code) + len(docs)
    assert np.array_equal(merged.tokens, np.concatenate([code.tokens, docs.tokens]))

    assert main(["sft", "--input", os.path.join(SAMPLE, "chat.jsonl"), "--output", f"{out}/sft",
                 "--tokenizer", llama3_model, "--seq-length", "4096"]) == 0
    assert PackedDataset(f"{out}/sft")[0].loss_mask is not None


def test_preprocess_with_a_hugging_face_folder_points_to_the_faster_rank_file(tmp_path, capsys,
                                                                            llama3_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello world"}\n')
    assert main(["preprocess", "--input", str(data), "--output-prefix", str(tmp_path / "o"),
                 "--tokenizer", llama3_dir, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"--tokenizer {os.path.join(llama3_dir, 'tokenizer.model')} gives the same ids" in out


def test_mix_with_zero_weights_fails_naming_the_recipe(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "zero.yaml", 4096, [{"path": "a", "weight": 0}])
    assert main(["mix", recipe, "--output", str(tmp_path / "o")]) == 2
    assert "zero.yaml: the source weights sum to 0.0" in capsys.readouterr().err
