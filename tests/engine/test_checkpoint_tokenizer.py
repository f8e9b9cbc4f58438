"""Checkpoints record the fingerprint of their data's tokenizer (engine.train) or of the Hugging
Face folder's (engine.convert import); training and evaluation refuse a tokenizer with other ids,
naming both, before any process group. Two tokenizers of the same size whose ids differ are
what a vocabulary-size check cannot tell apart."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from data_tools.packed_dataset import METADATA_FILE
from data_tools.tokenizer import load_tokenizer
from engine.checkpoint import STATE_FILE
from engine.convert.importer import import_checkpoint
from engine.training.config import ConfigError, load_config
from engine.training.plan import plan_from_config
from tests.distributed import run_command
from tests.engine.test_convert_layouts import random_hf_llama

VOCAB = 512  # the tiny model's


def _word_level_tokenizer(folder: Path, ids: list[int]) -> Path:
    """A tokenizer.json whose token "w{k}" has id ids[k]."""
    from tokenizers import Tokenizer, models

    folder.mkdir(parents=True)
    vocab = {f"w{k}": ids[k] for k in range(VOCAB)}
    Tokenizer(models.WordLevel(vocab, unk_token="w0")).save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def tokenizers_ab(tmp_path_factory):
    """Two tokenizers of 512 ids each: the same words, ids reversed in the second."""
    root = tmp_path_factory.mktemp("tokenizers")
    first = _word_level_tokenizer(root / "a", list(range(VOCAB)))
    second = _word_level_tokenizer(root / "b", list(reversed(range(VOCAB))))
    return load_tokenizer(str(first)).describe(), load_tokenizer(str(second)).describe()


@pytest.fixture(scope="module")
def imported(tokenizers_ab, tmp_path_factory):
    """An imported checkpoint of a Hugging Face folder that holds the first tokenizer."""
    hf = tmp_path_factory.mktemp("hf") / "model"
    random_hf_llama(hf)
    shutil.copy(Path(tokenizers_ab[0]["path"]) / "tokenizer.json", hf / "tokenizer.json")
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


def test_import_records_the_folders_tokenizer(imported, tokenizers_ab):
    saved = json.loads((imported / STATE_FILE).read_text())["tokenizer"]
    assert saved["vocabulary_fingerprint"] == tokenizers_ab[0]["vocabulary_fingerprint"]
    assert saved["vocab_size"] == VOCAB


def test_init_from_a_checkpoint_of_other_ids_is_refused_naming_both(
        imported, tokenizers_ab, packed_tiny_dataset, train_config, tmp_path, capsys):
    first, second = tokenizers_ab
    assert first["vocabulary_fingerprint"] != second["vocabulary_fingerprint"]

    def plan(tokenizer, name):
        config = load_config([train_config], [
            f"data.path={_data_of(packed_tiny_dataset, tmp_path / name, tokenizer)}",
            f"checkpoint.dir={tmp_path / 'run'}", f"checkpoint.init_from={imported.parent}",
            "model.overrides={num_layers: 4, untie_embeddings: true, rope_base: 500000.0}"])
        return plan_from_config(config, 1)

    with pytest.raises(ConfigError) as error:
        plan(second, "other")
    message = str(error.value)
    assert "checkpoint.init_from" in message and str(imported) in message
    assert first["vocabulary_fingerprint"] in message
    assert second["vocabulary_fingerprint"] in message
    assert plan(first, "same").data.tokenizer == first
    capsys.readouterr()
    assert plan(None, "unrecorded").data.tokenizer is None
    assert "records no tokenizer fingerprint" in capsys.readouterr().out


def test_evaluate_refuses_a_tokenizer_of_other_ids(imported, tokenizers_ab, tmp_path, capsys):
    from engine.evaluate.__main__ import main

    first, second = tokenizers_ab
    out = tmp_path / "eval"
    assert main(["--checkpoint", str(imported), "--tokenizer", second["path"],
                 "--lengths", "64", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--tokenizer {second['path']}" in err and "Traceback" not in err
    assert first["vocabulary_fingerprint"] in err and second["vocabulary_fingerprint"] in err
    assert not out.exists() and not dist.is_initialized()


def test_a_trained_checkpoint_keeps_its_datas_tokenizer_and_resumes_only_on_it(
        tokenizers_ab, packed_tiny_dataset, train_config, tmp_path, capsys):
    from engine.train import main

    first, second = tokenizers_ab
    run = tmp_path / "run"
    args = ["--config", train_config, f"checkpoint.dir={run}"]
    data = _data_of(packed_tiny_dataset, tmp_path / "first", first)
    result = run_command([sys.executable, "-m", "engine.train", *args, f"data.path={data}",
                          "train_steps=1"], timeout=180)
    assert result.returncode == 0, result.stdout[-2000:]
    saved = json.loads(next(run.glob(f"step_*/{STATE_FILE}")).read_text())["tokenizer"]
    assert saved["vocabulary_fingerprint"] == first["vocabulary_fingerprint"]
    other = _data_of(packed_tiny_dataset, tmp_path / "second", second)
    assert main(["--check", *args, f"data.path={other}"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.dir" in err and first["vocabulary_fingerprint"] in err
    assert second["vocabulary_fingerprint"] in err
