"""python -m engine.evaluate as a user runs it: a tiny checkpoint with the real Llama-3
vocabulary, in one process and in TP2 x PP2 and CP2 (both algorithms), and its Hugging Face
export through transformers, side by side; and the bad inputs it refuses."""
import json
import sys

import numpy as np
import pytest

from data_tools.indexed import IndexedWriter
from tests import distributed
from tests.distributed import run_command, torchrun
from tests.engine.evaluate_helpers import LLAMA3_VOCAB, llama3_tokenizer_dir
from tests.engine.test_convert_layouts import convert_cli, random_hf_llama

TASKS = ["niah_single", "niah_multivalue", "json_kv", "variable_tracking"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    random_hf_llama(root / "hf", vocab_size=LLAMA3_VOCAB, max_shard_size="50MB")
    assert convert_cli("import", "--hf", str(root / "hf"), "--out", str(root / "ckpt")
                       ).returncode == 0
    assert convert_cli("export", "--checkpoint", str(root / "ckpt"), "--out",
                       str(root / "export"), "--dtype", "float32").returncode == 0
    rng = np.random.default_rng(0)
    lengths = np.array([300, 20, 45, 300, 7, 90, 300, 12, 64, 33])
    with IndexedWriter(str(root / "docs"), np.int32) as writer:
        writer.add_documents(rng.integers(0, 128000, int(lengths.sum())).astype(np.int32),
                             lengths)
    tokenizer = f"{llama3_tokenizer_dir()}/tokenizer.model"
    common = ["--tokenizer", tokenizer, "--tasks", *TASKS, "--lengths", "256", "--depths", "2",
              "--samples", "1", "--long-documents", str(root / "docs"), "--position-length", "256",
              "--short-documents", str(root / "docs"), "--no-progress"]
    return {"root": root, "common": common, "tokenizer": tokenizer}


def _evaluate(*args, nproc=1, timeout=300):
    if nproc == 1:
        return run_command([sys.executable, "-m", "engine.evaluate", *args], timeout,
                           distributed.test_env())
    return torchrun("engine.evaluate", nproc, list(args), timeout=timeout, check=False)


def _report(out):
    return {c["name"]: c for c in json.loads((out / "report.json").read_text())["checkpoints"]}


@pytest.fixture(scope="module")
def single(tiny):
    out = tiny["root"] / "single"
    result = _evaluate("--checkpoint", f"base={tiny['root'] / 'ckpt'}", "--hf",
                       f"export={tiny['root'] / 'export'}", "--hf-scoring", "teacher-forced",
                       "--write-examples", *tiny["common"], "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:]
    return out


def _close(a, b, tolerance):
    return abs(a - b) <= tolerance * abs(b)


def _assert_same_measures(ours, reference, tolerance):
    cells, reference_cells = ours["recall"]["cells"], reference["recall"]["cells"]
    assert [(c["task"], c["length"], c["depth"], c["score"]) for c in cells] == [
        (c["task"], c["length"], c["depth"], c["score"]) for c in reference_cells]
    for a, b in zip(cells, reference_cells):
        assert _close(a["answer_loss"], b["answer_loss"], tolerance), (a, b)
    assert [b["tokens"] for b in ours["position_loss"]] == [
        b["tokens"] for b in reference["position_loss"]]
    for a, b in zip(ours["position_loss"], reference["position_loss"]):
        assert _close(a["loss"], b["loss"], tolerance), (a, b)
    short, short_ref = ours["short_document_loss"], reference["short_document_loss"]
    assert (short["documents"], short["tokens"]) == (short_ref["documents"], short_ref["tokens"])
    assert _close(short["loss"], short_ref["loss"], tolerance)


def test_the_command_writes_every_output_and_the_engine_matches_its_export(single):
    files = {p.name for p in single.iterdir()}
    assert {"report.json", "report.md", "recall_vs_length.png", "loss_vs_position.png"} <= files
    assert {f"recall_heatmap_{task}.png" for task in TASKS} <= files
    assert not [name for name in files if "tmp" in name]
    report = _report(single)
    engine, export = report["base"], report["export"]
    assert engine["scoring"] == "teacher_forced" and len(engine["recall"]["cells"]) == 2 * len(TASKS)
    # Loss by position over 3 documents of >= 256 tokens (255 predicted tokens each), short
    # loss over the 7 documents of 2..255 tokens: the numbers exist and are an untrained
    # model's (~log 128256 = 11.8).
    assert sum(b["tokens"] for b in engine["position_loss"]) == 3 * 255
    assert engine["short_document_loss"]["documents"] == 7
    assert 10 < engine["short_document_loss"]["loss"] < 14
    # transformers on the exported folder (fp32) scores what the engine scores.
    _assert_same_measures(engine, export, 1e-4)
    assert "| base |" in (single / "report.md").read_text()
    # examples.jsonl: the engine's teacher-forced argmax text of each answer is the export's.
    lines = [json.loads(line) for line in (single / "examples.jsonl").read_text().splitlines()]
    predicted = {}
    for line in lines:
        predicted.setdefault(line["checkpoint"], []).append(line["predicted"])
    assert len(predicted["base"]) == 2 * len(TASKS) and all(predicted["base"])
    assert predicted["base"] == predicted["export"]


@pytest.mark.parametrize("nproc, overrides", [
    (4, ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2",
         "parallel.sequence_parallel=true"]),
    (2, ["parallel.context_parallel=2", "parallel.cp_algorithm=all-gather"]),
    (2, ["parallel.context_parallel=2", "parallel.cp_algorithm=ulysses"]),
], ids=["tp2_pp2", "cp2_all_gather", "cp2_ulysses"])
def test_parallel_layouts_score_like_one_process(nproc, overrides, tiny, single, tmp_path):
    result = _evaluate("--checkpoint", f"base={tiny['root'] / 'ckpt'}", *tiny["common"],
                       "--out", str(tmp_path), *overrides, nproc=nproc, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    _assert_same_measures(_report(tmp_path)["base"], _report(single)["base"], 1e-5)


def test_generation_finds_at_least_what_teacher_forcing_finds(tiny, single, tmp_path):
    result = _evaluate("--hf", f"export={tiny['root'] / 'export'}", "--tokenizer",
                       tiny["tokenizer"], "--tasks", *TASKS, "--lengths", "256", "--depths", "2",
                       "--samples", "1", "--no-progress", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:]
    generated = _report(tmp_path)["export"]
    assert generated["scoring"] == "generation"
    forced = {(c["task"], c["depth"]): c["score"]
              for c in _report(single)["base"]["recall"]["cells"]}
    for cell in generated["recall"]["cells"]:
        assert cell["score"] >= forced[(cell["task"], cell["depth"])]


def test_a_length_beyond_the_trained_context_warns_and_runs(tiny, tmp_path):
    # The tiny model was built with max_position_embeddings 4096.
    result = _evaluate("--checkpoint", str(tiny["root"] / "ckpt"), "--tokenizer",
                       tiny["tokenizer"], "--tasks", "niah_single", "--lengths", "4200",
                       "--depths", "0.5", "--samples", "1", "--no-progress", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:]
    assert "beyond the 4096 tokens of context" in result.stdout
    assert (tmp_path / "report.json").exists()


def test_bad_inputs_stop_with_exit_2_naming_the_value(tiny, tmp_path):
    root = tiny["root"]
    random_hf_llama(root / "hf512", vocab_size=512)
    assert convert_cli("import", "--hf", str(root / "hf512"), "--out",
                       str(root / "ckpt512")).returncode == 0
    with IndexedWriter(str(root / "small"), np.int32) as writer:
        writer.add_documents(np.arange(50, dtype=np.int32), np.array([50]))
    base = ["--tokenizer", tiny["tokenizer"], "--lengths", "1024", "--no-progress"]
    cases = [
        (["--checkpoint", str(root / "ckpt512"), *base], "vocabulary"),
        (["--checkpoint", str(root / "ckpt"), *base, "--haystack", str(root / "small")],
         "haystack"),
        (["--checkpoint", str(tmp_path), *base], "give a run directory of engine.train"),
        (["--checkpoint", str(root / "ckpt"), *base, "--tasks", "niah_triple"], "niah_triple"),
        (["--checkpoint", str(root / "ckpt"), "--lengths", "1024"], "--lengths needs --tokenizer"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        result = _evaluate(*args, "--out", str(out))
        assert result.returncode == 2, (args, result.stdout[-2000:])
        assert message in result.stdout, (message, result.stdout[-2000:])
        assert "Traceback" not in result.stdout and not out.exists()


def test_samples_default_to_a_usable_interval_unless_a_config_sets_them(tmp_path):
    from engine.evaluate.__main__ import DEFAULT_SAMPLES, _config, _parser

    def samples(*argv):
        return _config(_parser().parse_args(["--out", str(tmp_path), *argv])).eval.samples

    config = tmp_path / "eval.yaml"
    config.write_text("eval:\n  samples: 3\n")
    assert DEFAULT_SAMPLES == 20 and samples() == 20
    assert samples("--samples", "5") == 5
    assert samples("--config", str(config)) == 3
    assert samples("eval.samples=2") == 2
    assert samples("--config", str(config), "--samples", "7") == 7
