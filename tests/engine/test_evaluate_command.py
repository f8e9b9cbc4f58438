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


def _chain_llama(folder, chain, eos=128001):
    """A Hugging Face Llama that, fed token chain[i], predicts chain[i + 1] (after the last, EOS)
    whatever came before: attention and MLP write nothing, each chain token's embedding is its
    own axis of the residual stream and the output layer maps that axis to the next token.
    Every other token embeds as zeros, whose logits tie at 0 (token 0, "!", wins)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=LLAMA3_VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, rope_theta=500000.0, bos_token_id=128000,
                         eos_token_id=eos, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
        for axis, (token, following) in enumerate(zip(chain, [*chain[1:], eos])):
            model.model.embed_tokens.weight[token, axis] = 1.0
            model.lm_head.weight[following, axis] = 1.0
    model.save_pretrained(folder)


def test_generation_finds_what_a_model_that_knows_the_answer_says(tmp_path):
    """A model that knows the niah_single needle's answer (it continues the prompt's last token
    with the answer's tokens) and nothing else: greedy generation through the command finds
    the needle (score 1, the answer in its output), teacher forcing on it too, and neither
    finds anything where the model knows nothing (variable_tracking)."""
    from data_tools.tokenizer import load_tokenizer
    from engine.evaluate.haystack import load_haystack
    from engine.evaluate.tasks import RecallSuite

    tokenizer_file = f"{llama3_tokenizer_dir()}/tokenizer.model"
    tokenizer = load_tokenizer(tokenizer_file)
    # The example the command makes (its defaults: the noise haystack, seed 0).
    needle = next(RecallSuite(tokenizer, load_haystack("noise", tokenizer), seed=0).examples(
        ["niah_single"], [256], [0.5], 1))
    chain = [int(needle.prompt_ids[-1]), *map(int, needle.answer_ids)]
    assert len(set(chain)) == len(chain) <= 64, chain  # one axis per token, one successor each
    _chain_llama(tmp_path / "knows", chain)
    scores = {}
    for scoring in ("generation", "teacher-forced"):
        out = tmp_path / scoring
        result = _evaluate("--hf", f"knows={tmp_path / 'knows'}", "--hf-scoring", scoring,
                           "--tokenizer", tokenizer_file, "--tasks", "niah_single",
                           "variable_tracking", "--lengths", "256", "--depths", "0.5",
                           "--samples", "1", "--write-examples", "--no-progress", "--out",
                           str(out))
        assert result.returncode == 0, result.stdout[-3000:]
        report = _report(out)["knows"]
        assert report["scoring"] == scoring.replace("-", "_")
        scores[scoring] = {c["task"]: c["score"] for c in report["recall"]["cells"]}
        lines = {line["task"]: line for line in map(
            json.loads, (out / "examples.jsonl").read_text().splitlines())}
        assert lines["niah_single"]["gold"] == list(needle.gold)
    assert scores["generation"] == {"niah_single": 1.0, "variable_tracking": 0.0}, scores
    assert scores["teacher-forced"] == scores["generation"]
    # The generated text: the answer's tokens, then EOS.
    assert lines["niah_single"]["output"] is None  # the last run was teacher-forced
    generated = [json.loads(line) for line in (tmp_path / "generation" / "examples.jsonl")
                 .read_text().splitlines() if '"niah_single"' in line][0]
    assert generated["output"].startswith(tokenizer.decode(needle.answer_ids)), generated


def test_a_length_beyond_the_trained_context_warns_and_runs(tiny, tmp_path):
    """At 4,200 tokens (the tiny model was built with max_position_embeddings 4096) the engine
    scores a finite answer loss, the one transformers computes on the export."""
    import math

    result = _evaluate("--checkpoint", f"base={tiny['root'] / 'ckpt'}", "--hf",
                       f"export={tiny['root'] / 'export'}", "--hf-scoring", "teacher-forced",
                       "--tokenizer", tiny["tokenizer"], "--tasks", "niah_single", "--lengths",
                       "4200", "--depths", "0.5", "--samples", "1", "--no-progress", "--out",
                       str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:]
    assert "beyond the 4096 tokens of context" in result.stdout
    report = _report(tmp_path)
    (engine,), (export,) = report["base"]["recall"]["cells"], report["export"]["recall"]["cells"]
    assert engine["length"] == export["length"] == 4200
    assert math.isfinite(engine["answer_loss"]) and engine["answer_loss"] > 0, engine
    assert _close(engine["answer_loss"], export["answer_loss"], 1e-4), (
        f"answer loss at 4200 tokens: engine {engine['answer_loss']}, transformers on the "
        f"export {export['answer_loss']}")
    assert engine["score"] == export["score"]
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


def _copy_checkpoint(tiny, folder):
    import shutil
    step = sorted((tiny["root"] / "ckpt").glob("step_*"))[-1]
    shutil.copytree(step, folder)
    return folder


def _largest_file(folder, pattern="*"):
    return max((p for p in folder.rglob(pattern) if p.is_file() and not p.name.endswith(
        ".json")), key=lambda p: p.stat().st_size)


def _hf_copy(tiny, folder, change):
    """A copy of the export whose weights are links (or, with ``change`` "truncate", a cut
    copy of the largest shard) and whose config.json ``change`` may edit."""
    import shutil
    folder.mkdir()
    for path in (tiny["root"] / "export").iterdir():
        if path.suffix == ".safetensors" and change != "truncate":
            (folder / path.name).symlink_to(path)
        else:
            shutil.copy(path, folder / path.name)
    if change == "truncate":
        shard = _largest_file(folder, "*.safetensors")
        data = shard.read_bytes()
        shard.write_bytes(data[:len(data) // 2])
    elif change == "no_vocab":
        config = json.loads((folder / "config.json").read_text())
        del config["vocab_size"]
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def _read_only_probe(monkeypatch, name):
    """Creating files in folders called ``name`` fails as on a read-only mount (root, who runs
    the tests in CI containers, is not stopped by mode bits)."""
    import errno
    import os
    import tempfile

    from data_tools import outputs
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and os.path.basename(dir) == name:
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*args, dir=dir, **kwargs)
    monkeypatch.setattr(outputs.tempfile, "mkstemp", mkstemp)


@pytest.mark.parametrize("case", [
    "report_json_folder", "out_file", "out_under_file", "out_read_only", "depths_1_5",
    "no_long_document", "no_short_document", "huge_length", "truncated_checkpoint",
    "no_manifest", "hf_no_vocab_size", "hf_truncated_shard", "port_taken", "world_size_0"])
def test_check_and_run_refuse_bad_input_before_any_work(case, tiny, tmp_path, capsys,
                                                        monkeypatch):
    """python -m engine.evaluate, in this process, with and without --check: exit 2 naming
    the input, the value and the fix; no traceback, no process group, nothing written."""
    import socket

    import torch.distributed as dist

    from engine.evaluate.__main__ import main
    root = tiny["root"]
    out = tmp_path / "out"
    target = ["--checkpoint", str(root / "ckpt")]
    measures = ["--tokenizer", tiny["tokenizer"], "--tasks", "niah_single", "--lengths", "256",
                "--depths", "0.5", "--no-progress"]
    holder = None
    if case == "report_json_folder":
        (out / "report.json").mkdir(parents=True)
        message = f"--out {out} holds report.json (a folder), which is not part of"
    elif case == "out_file":
        out.write_text("x")
        message = f"--out {out} is a file, where the report folder would be written"
    elif case == "out_under_file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
        message = f"{tmp_path / 'file'} is a file, not a folder"
    elif case == "out_read_only":
        (tmp_path / "read_only").mkdir()
        _read_only_probe(monkeypatch, "read_only")
        out = tmp_path / "read_only" / "out"
        message = f"cannot create files in {tmp_path / 'read_only'}: it is on a read-only file"
    elif case == "depths_1_5":
        measures[measures.index("0.5")] = "1.5"
        message = "--depths 1.5: one value of 1 or more is a count of depths; give a whole count"
    elif case == "no_long_document":
        measures = ["--long-documents", str(root / "docs"), "--position-length", "1000"]
        message = (f"--long-documents {root / 'docs'}: no document holds --position-length 1000 "
                   f"tokens (the longest of its 10 holds 300): lower --position-length")
    elif case == "no_short_document":
        measures = ["--short-documents", str(root / "docs"), "--position-length", "7"]
        message = (f"--short-documents {root / 'docs'}: no document of 2 to 6 tokens (its 10 "
                   f"documents hold 7 or more)")
    elif case == "huge_length":
        measures[measures.index("256")] = "100000000000"
        message = ("--lengths 100000000000 is beyond 8 x the longest context the models were "
                   "trained for (ckpt: 4096 tokens): give lengths up to 32768")
    elif case == "truncated_checkpoint":
        step = _copy_checkpoint(tiny, tmp_path / "step_00000000")
        victim = _largest_file(step)
        victim.write_bytes(victim.read_bytes()[:-10])
        target = ["--checkpoint", str(step)]
        message = victim.name
    elif case == "no_manifest":
        step = _copy_checkpoint(tiny, tmp_path / "step_00000000")
        (step / "manifest.json").unlink()
        target = ["--checkpoint", str(step)]
        message = "manifest.json is missing, but"
    elif case in ("hf_no_vocab_size", "hf_truncated_shard"):
        change = "no_vocab" if case == "hf_no_vocab_size" else "truncate"
        folder = _hf_copy(tiny, tmp_path / "hf", change)
        target = ["--hf", str(folder)]
        message = (f"--hf {folder}: {folder / 'config.json'} has vocab_size None, not a positive"
                   if change == "no_vocab" else f"--hf {folder}: ")
        if change == "truncate":
            message += f"{_largest_file(folder, '*.safetensors').name} is damaged (it holds"
    elif case == "port_taken":
        holder = socket.socket()
        holder.bind(("", 0))
        holder.listen()
        monkeypatch.setenv("MASTER_PORT", str(holder.getsockname()[1]))
        message = f"MASTER_PORT {holder.getsockname()[1]} cannot be used"
    elif case == "world_size_0":
        measures += ["--world-size", "0"]
        message = "--world-size 0: give the run's number of processes (>= 1)"
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    try:
        for check in (["--check"], []):
            assert main([*check, *target, *measures, "--out", str(out)]) == 2, case
            err = capsys.readouterr().err
            assert message in err, err
            assert "Traceback" not in err and not dist.is_initialized()
            assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    finally:
        if holder is not None:
            holder.close()


def test_check_passes_what_runs_and_writes_nothing(tiny, tmp_path, capsys, monkeypatch):
    from engine.evaluate.__main__ import main
    monkeypatch.delenv("MASTER_PORT", raising=False)  # the check may pick one for this process
    out = tmp_path / "out"
    args = ["--checkpoint", f"base={tiny['root'] / 'ckpt'}", "--hf",
            f"export={tiny['root'] / 'export'}", *tiny["common"], "--out", str(out)]
    assert main(["--check", *args]) == 0
    assert "evaluation plan ok: 2 target(s), 8 recall examples" in capsys.readouterr().out
    assert not out.exists()


def test_a_checkpoint_damaged_inside_a_file_ends_with_exit_2(tiny, tmp_path):
    """Contents are checked by the load, after the process group exists: still exit 2 naming
    the file, no traceback, no report."""
    step = _copy_checkpoint(tiny, tmp_path / "step_00000000")
    victim = _largest_file(step)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    result = _evaluate("--checkpoint", str(step), "--tokenizer", tiny["tokenizer"], "--tasks",
                       "niah_single", "--lengths", "256", "--depths", "0.5", "--no-progress",
                       "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stdout[-3000:]
    assert f"error: --checkpoint {step}: " in result.stdout and victim.name in result.stdout
    assert "Traceback" not in result.stdout and not (tmp_path / "out").exists()


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
