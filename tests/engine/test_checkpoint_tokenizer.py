"""Checkpoints record their tokenizer (engine.convert import: the Hugging Face folder's;
engine.train: the data's), and engine.train and engine.evaluate refuse data or a --tokenizer of
other ids, naming both, before any process group. One vocabulary in two file formats is one
tokenizer: the Hugging Face folder's tokenizer.json (Llama-3.2's, 128,257 ids with <|image|>)
and the data's tokenizer.model (128,256 ids), as in the recipe."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist

from data_tools.indexed import IndexedWriter
from data_tools.packed_dataset import METADATA_FILE
from data_tools.summary import write_summary
from data_tools.tokenizer import load_tokenizer
from engine.checkpoint import STATE_FILE
from engine.convert.importer import import_checkpoint
from engine.training.config import load_config
from engine.training.run_plan import plan_from_config
from tests.distributed import run_command
from tests.engine.evaluate_helpers import llama3_tokenizer_dir
from tests.engine.test_convert_layouts import random_hf_llama

# The imported model's shape in engine.train's config (random_hf_llama: 4 layers, untied).
IMPORTED_SHAPE = "model.overrides={num_layers: 4, untie_embeddings: true, rope_base: 500000.0}"


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Llama-3's tokenizer.model, the shipped tokenizer.json of the same ids and a copy of the
    rank file with two ranks swapped (same size, other ids)."""
    shipped = Path(llama3_tokenizer_dir())
    lines = (shipped / "tokenizer.model").read_bytes().split(b"\n")
    (a, rank_a), (b, rank_b) = lines[1000].split(), lines[1001].split()
    lines[1000], lines[1001] = a + b" " + rank_b, b + b" " + rank_a
    swapped = tmp_path_factory.mktemp("swapped") / "tokenizer.model"
    swapped.write_bytes(b"\n".join(lines))
    return {"model": str(shipped / "tokenizer.model"), "json": str(shipped),
            "swapped": str(swapped)}


@pytest.fixture(scope="module")
def records(tokenizers):
    return {name: load_tokenizer(path).describe() for name, path in tokenizers.items()}


@pytest.fixture(scope="module")
def imported(tokenizers, tmp_path_factory):
    """An imported checkpoint of a Hugging Face folder holding the shipped tokenizer.json."""
    hf = tmp_path_factory.mktemp("hf") / "model"
    random_hf_llama(hf)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tokenizers["json"]) / name, hf / name)
    out = tmp_path_factory.mktemp("imported") / "ckpt"
    import_checkpoint(hf, out, log=lambda *_: None)
    return out / "step_00000000"


def _data_of(packed: str, folder: Path, tokenizer) -> str:
    """A copy of the packed dataset recording `tokenizer` (None: recording none)."""
    shutil.copytree(packed, folder)
    metadata = json.loads((folder / METADATA_FILE).read_text())
    metadata["tokenizer"] = tokenizer
    (folder / METADATA_FILE).write_text(json.dumps(metadata))
    return str(folder)


def test_import_records_the_folders_tokenizer(imported, records):
    saved = json.loads((imported / STATE_FILE).read_text())["tokenizer"]
    assert (saved["kind"], saved["file"], saved["vocab_size"]) == (
        "huggingface", "tokenizer.json", 128257)
    assert saved["vocabulary_fingerprint"] == records["model"]["vocabulary_fingerprint"]


def test_train_check_takes_one_vocabulary_in_two_formats_and_refuses_other_ids(
        imported, records, packed_tiny_dataset, train_config, tmp_path, capsys):
    from engine.train import main

    def check(name, tokenizer):
        data = _data_of(packed_tiny_dataset, tmp_path / name, tokenizer)
        return main(["--check", "--config", train_config, f"data.path={data}",
                     f"checkpoint.dir={tmp_path / 'run'}", f"checkpoint.init_from={imported.parent}",
                     IMPORTED_SHAPE])

    # The recipe's case: data of tokenizer.model, a model imported with its tokenizer.json.
    assert check("model", records["model"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert check("swapped", records["swapped"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint.init_from: checkpoint {imported} was trained with tokenizer " \
           f"huggingface tokenizer.json (128,257 ids, vocabulary " \
           f"{records['json']['vocabulary_fingerprint']})" in err, err
    assert f"data.path {tmp_path / 'swapped'} holds ids of tokenizer tiktoken tokenizer.model " \
           f"(128,256 ids, vocabulary {records['swapped']['vocabulary_fingerprint']})" in err
    assert "re-tokenize the data with the checkpoint's tokenizer" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()
    # Held-out data evaluated during the run: of the run's tokenizer too.
    held_out = _data_of(packed_tiny_dataset, tmp_path / "held_out", records["swapped"])
    assert main(["--check", "--config", train_config, f"data.path={tmp_path / 'model'}",
                 f"checkpoint.dir={tmp_path / 'run'}", f"checkpoint.init_from={imported.parent}",
                 IMPORTED_SHAPE, f"eval.data={held_out}", "eval.interval=1"]) == 2
    err = capsys.readouterr().err
    assert f"eval.data {held_out} is tokenizer tiktoken tokenizer.model (128,256 ids, " \
           f"vocabulary {records['swapped']['vocabulary_fingerprint']}), but data.path " \
           f"{tmp_path / 'model'} holds ids of tokenizer tiktoken tokenizer.model" in err, err


def test_data_recording_no_tokenizer_passes_and_runs_keep_the_checkpoints(
        imported, records, packed_tiny_dataset, train_config, tmp_path, capsys):
    config = load_config([train_config], [
        f"data.path={_data_of(packed_tiny_dataset, tmp_path / 'none', None)}",
        f"checkpoint.dir={tmp_path / 'run'}", f"checkpoint.init_from={imported.parent}",
        IMPORTED_SHAPE])
    plan = plan_from_config(config, 1)
    assert "data.path" in capsys.readouterr().out
    # What the run's checkpoints will record: the tokenizer of the checkpoint it started from.
    assert plan.data.tokenizer == records["json"] | {"path": plan.data.tokenizer["path"]}


def _long_documents(folder: Path, tokenizer) -> str:
    """An indexed dataset of 4 documents of 80 ids < 512 whose summary records `tokenizer`."""
    folder.mkdir()
    prefix = str(folder / "long")
    with IndexedWriter(prefix) as writer:
        writer.add_documents(np.arange(320, dtype=np.int32) % 512, np.full(4, 80, np.int64))
    write_summary(prefix, {"tokenizer": tokenizer})
    return prefix


def test_evaluate_refuses_a_tokenizer_or_data_of_other_ids(imported, records, tokenizers,
                                                           tmp_path, capsys):
    from engine.evaluate.__main__ import main

    out = tmp_path / "eval"

    def evaluate(tokenizer, data, *extra):
        return main(["--checkpoint", str(imported), "--tokenizer", tokenizers[tokenizer],
                     "--long-documents", data, "--position-length", "64", "--out", str(out),
                     *extra])

    same = _long_documents(tmp_path / "same", records["model"])
    assert evaluate("model", same, "--check") == 0, capsys.readouterr().err
    capsys.readouterr()
    target = f"--checkpoint {imported.name} ({imported})"
    for tokenizer, data, flag in (("swapped", same, f"--tokenizer {tokenizers['swapped']}"),
                                  ("model", _long_documents(tmp_path / "other",
                                                            records["swapped"]),
                                   f"--long-documents {tmp_path / 'other' / 'long'}")):
        for extra in (["--check"], []):  # the check, and the run before any process group
            assert evaluate(tokenizer, data, *extra) == 2
            err = capsys.readouterr().err
            assert f"{flag} is tokenizer tiktoken tokenizer.model (128,256 ids, vocabulary " \
                   f"{records['swapped']['vocabulary_fingerprint']})" in err, err
            assert f"{target} was trained with tokenizer huggingface tokenizer.json (128,257 " \
                   f"ids, vocabulary {records['json']['vocabulary_fingerprint']})" in err
            assert f"give the tokenizer of {target}, and data tokenized by it" in err
            assert "Traceback" not in err
            assert not out.exists() and not dist.is_initialized()


def test_a_trained_checkpoint_keeps_its_datas_tokenizer_and_resumes_only_on_it(
        records, packed_tiny_dataset, train_config, tmp_path, capsys):
    from engine.train import main

    run = tmp_path / "run"
    args = ["--config", train_config, f"checkpoint.dir={run}"]
    data = _data_of(packed_tiny_dataset, tmp_path / "first", records["model"])
    result = run_command([sys.executable, "-m", "engine.train", *args, f"data.path={data}",
                          "train_steps=1"], timeout=300)
    assert result.returncode == 0, result.stdout[-2000:]
    saved = json.loads(next(run.glob(f"step_*/{STATE_FILE}")).read_text())["tokenizer"]
    assert saved == records["model"]
    # The same vocabulary as tokenizer.json resumes; other ids do not.
    assert main(["--check", *args, "data.path=" + _data_of(
        packed_tiny_dataset, tmp_path / "json", records["json"])]) == 0
    other = _data_of(packed_tiny_dataset, tmp_path / "second", records["swapped"])
    capsys.readouterr()
    assert main(["--check", *args, f"data.path={other}"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.dir: checkpoint" in err and records["model"]["vocabulary_fingerprint"] in err
    assert records["swapped"]["vocabulary_fingerprint"] in err


def test_ruler_and_helmet_protocols_refuse_a_tokenizer_of_other_ids(imported, records,
                                                                    tokenizers, tmp_path,
                                                                    capsys):
    """--protocol ruler/helmet-recall builds its prompts with --tokenizer and feeds them to the
    checkpoint's export or the Hugging Face folder: other ids are refused before any prompt is
    built, naming both; the same vocabulary in the other file format passes on (here to vt's
    own refusal of a length below its one-shot example)."""
    from engine.evaluate.__main__ import main

    out = tmp_path / "ruler"
    hf = tmp_path / "hf"
    random_hf_llama(hf)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tokenizers["json"]) / name, hf / name)
    for model, described in ((["--checkpoint", str(imported)],
                              f"--checkpoint {imported} was trained with"),
                             (["--hf", str(hf)], f"--hf {hf} ships")):
        code = main([*model, "--tokenizer", tokenizers["swapped"], "--tasks", "vt",
                     "--lengths", "100", "--out", str(out)], protocol="ruler")
        err = capsys.readouterr().err
        assert code == 2
        assert (f"--tokenizer {tokenizers['swapped']} is tokenizer tiktoken tokenizer.model "
                f"(128,256 ids, vocabulary {records['swapped']['vocabulary_fingerprint']}), "
                f"but {described} tokenizer huggingface tokenizer.json") in err, err
        assert "Traceback" not in err and not out.exists()
        code = main([*model, "--tokenizer", tokenizers["model"], "--tasks", "vt",
                     "--lengths", "100", "--out", str(out)], protocol="ruler")
        err = capsys.readouterr().err
        assert code == 2 and "is tokenizer" not in err and "vt" in err, err


def test_evaluate_refuses_a_tokenizer_other_than_the_hf_folders(records, tokenizers, tmp_path,
                                                                capsys):
    """engine.evaluate --hf: the folder's own tokenizer files say what its model's ids mean; a
    --tokenizer of other ids is refused, naming both; the same vocabulary passes --check."""
    from engine.evaluate.__main__ import main

    hf = tmp_path / "hf"
    random_hf_llama(hf)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tokenizers["json"]) / name, hf / name)
    same = _long_documents(tmp_path / "same", records["model"])
    out = tmp_path / "eval"

    def evaluate(tokenizer):
        return main(["--hf", str(hf), "--tokenizer", tokenizers[tokenizer], "--long-documents",
                     same, "--position-length", "64", "--out", str(out), "--check"])

    assert evaluate("model") == 0, capsys.readouterr().err
    capsys.readouterr()
    assert evaluate("swapped") == 2
    err = capsys.readouterr().err
    assert (f"--tokenizer {tokenizers['swapped']} is tokenizer tiktoken tokenizer.model "
            f"(128,256 ids, vocabulary {records['swapped']['vocabulary_fingerprint']}), but "
            f"--hf hf ({hf}) ships tokenizer huggingface tokenizer.json") in err, err
    assert "Traceback" not in err and not out.exists()
