"""Evaluation inside engine.train: validation loss and recall every eval.interval steps (console,
metrics.jsonl, TensorBoard), and a full report of the final checkpoint with eval.final."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_tools.indexed import IndexedWriter
from data_tools.packed_dataset import PackedDataset
from tests.distributed import REPO, run_command, torchrun
from tests.engine.evaluate_helpers import llama3_tokenizer_dir


def _eval_rows(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "eval/loss" in r or "eval/recall" in r}


def test_validation_loss_is_logged_and_layout_independent(packed_tiny_dataset, train_config,
                                                          tmp_path):
    common = ["--config", train_config, f"data.path={packed_tiny_dataset}", "train_steps=4",
              f"eval.data={packed_tiny_dataset}", "eval.interval=2", "eval.batches=2",
              "logging.tensorboard=true"]
    single = torchrun("engine.train", 1, [*common, f"checkpoint.dir={tmp_path / 'one'}"])
    assert "eval at step 2 | loss" in single.stdout and "eval at step 4 | loss" in single.stdout
    one = _eval_rows(tmp_path / "one")
    assert sorted(one) == [2, 4]
    # 2 batches of 4 sequences of 64 tokens: every token's next token is a target except the
    # last token of each document (data.mask_cross_document, on by default; a sequence's last
    # token included): 64 - documents per sequence.
    dataset = PackedDataset(packed_tiny_dataset)
    sequences = [dataset[i] for i in range(8)]
    assert all(s.loss_mask is None and s.doc_lengths.sum() == 64 for s in sequences)
    expected_tokens = sum(64 - len(s.doc_lengths) for s in sequences)
    for step in (2, 4):
        assert one[step]["eval/tokens"] == expected_tokens, (
            f"validation at step {step} counted {one[step]['eval/tokens']} target tokens, the 8 "
            f"held-out sequences hold {expected_tokens}")
    assert one[4]["eval/loss"] < one[2]["eval/loss"]  # it trained on this data
    torchrun("engine.train", 2, [*common, f"checkpoint.dir={tmp_path / 'tp2'}",
                                 "parallel.tensor_parallel=2"])
    tp2 = _eval_rows(tmp_path / "tp2")
    for step in (2, 4):
        assert tp2[step]["eval/tokens"] == one[step]["eval/tokens"]
        assert tp2[step]["eval/loss"] == pytest.approx(one[step]["eval/loss"], rel=1e-5)
    events = list((tmp_path / "one" / "tensorboard").glob("events.*"))
    assert events and b"eval/loss" in events[0].read_bytes()


def test_bad_eval_settings_stop_before_training(packed_tiny_dataset, train_config, tmp_path):
    cases = [(["eval.interval=2"], "nothing to evaluate"),
             (["eval.interval=2", "eval.data=/nonexistent"], "eval.data /nonexistent"),
             (["eval.final=true", "eval.lengths=[256]"], "eval.lengths needs eval.tokenizer")]
    for overrides, message in cases:
        result = run_command([sys.executable, "-m", "engine.train", "--config", train_config,
                              f"data.path={packed_tiny_dataset}",
                              f"checkpoint.dir={tmp_path / 'ckpt'}", *overrides], timeout=120)
        assert result.returncode == 2 and message in result.stdout, result.stdout[-2000:]
        assert not (tmp_path / "ckpt").exists()


@pytest.fixture(scope="module")
def llama3_vocab_data(tmp_path_factory):
    """A 256-token packed mixture of random ids of Llama-3's vocabulary, and its documents."""
    root = tmp_path_factory.mktemp("llama3_vocab")
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 400, 40)
    with IndexedWriter(str(root / "docs"), np.int32) as writer:
        writer.add_documents(rng.integers(0, 128000, int(lengths.sum())).astype(np.int32),
                             lengths)
    (root / "recipe.yaml").write_text("name: t\nseq_length: 256\nseed: 1\nsources:\n"
                                      "  - {name: docs, path: docs, weight: 1}\n")
    subprocess.run([sys.executable, "-m", "data_tools", "mix", str(root / "recipe.yaml"),
                    "--output", str(root / "packed"), "--data-root", str(root)], check=True,
                   cwd=REPO, capture_output=True)
    return root


def test_final_checkpoint_gets_a_full_evaluation(llama3_vocab_data, tmp_path):
    root = llama3_vocab_data
    run = tmp_path / "run"
    result = torchrun("engine.train", 1, [
        "--config", str(REPO / "examples" / "quickstart" / "train-stage1.yaml"),
        f"data.path={root / 'packed'}", f"checkpoint.dir={run}", "parallel.tensor_parallel=1",
        "parallel.pipeline_parallel=1", "parallel.sequence_parallel=false", "train_steps=2",
        "checkpoint.save_interval=0", "logging.tensorboard=false", "eval.interval=2",
        f"eval.tokenizer={llama3_tokenizer_dir()}/tokenizer.model", "eval.lengths=[256]",
        "eval.tasks=[niah_single, json_kv]", "eval.depths=2", "eval.final=true",
        "eval.final_lengths=[512]", f"eval.long_documents={root / 'docs'}",
        "eval.position_length=300", f"eval.short_documents={root / 'docs'}"], timeout=600)
    assert "final evaluation:" in result.stdout
    rows = _eval_rows(run)
    assert 0 <= rows[2]["eval/recall"] <= 1 and "eval/recall/niah_single/256" in rows[2]
    report = json.loads((run / "eval" / "report.json").read_text())["checkpoints"][0]
    assert report["checkpoint"].endswith("step_00000002")
    assert {c["length"] for c in report["recall"]["cells"]} == {512}
    assert sum(b["tokens"] for b in report["position_loss"]) > 0
    assert report["short_document_loss"]["tokens"] > 0
    assert (run / "eval" / "report.md").exists()

    # The same measures as a standalone `python -m engine.evaluate` of that checkpoint.
    standalone = run_command([
        sys.executable, "-m", "engine.evaluate", "--checkpoint", str(run / "step_00000002"),
        "--tokenizer", f"{llama3_tokenizer_dir()}/tokenizer.model", "--tasks", "niah_single",
        "json_kv", "--lengths", "512", "--depths", "2", "--samples", "1", "--seed", "0",
        "--long-documents", str(root / "docs"), "--position-length", "300",
        "--max-documents", "8", "--short-documents", str(root / "docs"), "--no-progress",
        "--out", str(tmp_path / "standalone")], timeout=600)
    assert standalone.returncode == 0, standalone.stdout[-3000:]
    (alone,) = json.loads((tmp_path / "standalone" / "report.json").read_text())["checkpoints"]
    assert [(c["task"], c["length"], c["depth"], c["score"]) for c in alone["recall"]["cells"]] \
        == [(c["task"], c["length"], c["depth"], c["score"]) for c in report["recall"]["cells"]]
    for a, b in zip(alone["recall"]["cells"], report["recall"]["cells"]):
        assert a["answer_loss"] == pytest.approx(b["answer_loss"], rel=1e-5), (a, b)
    assert [b["tokens"] for b in alone["position_loss"]] == [
        b["tokens"] for b in report["position_loss"]]
    for a, b in zip(alone["position_loss"], report["position_loss"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a, b)
    for field in ("documents", "tokens"):
        assert alone["short_document_loss"][field] == report["short_document_loss"][field]
    assert alone["short_document_loss"]["loss"] == pytest.approx(
        report["short_document_loss"]["loss"], rel=1e-5)
