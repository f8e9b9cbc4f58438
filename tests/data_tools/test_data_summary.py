"""What a dataset records of its tokens (tokenizer, largest id), and merge/mix refusing datasets
of different tokenizers."""
import json
import os

import numpy as np
import pytest

from data_tools.indexed import IndexedReader
from data_tools.mixture import RecipeError, build_mixture, load_recipe
from data_tools.packed_dataset import METADATA_FILE, PackedDataset
from data_tools.preprocess import PreprocessOptions, preprocess
from data_tools.sft import build_sft
from data_tools.stats import inspect_document, merge_datasets
from data_tools.summary import MixedTokenizersError, read_summary
from data_tools_helpers import write_recipe
from test_data_tokenizer import _swapped_ranks, _without_image_token

SAMPLE_CHAT = os.path.join(os.path.dirname(__file__), "..", "..", "data_tools", "sample",
                           "chat.jsonl")


@pytest.fixture(scope="module")
def small_sets(tmp_path_factory, doc_records, llama3_model, sentencepiece_model):
    """The same 12 documents tokenized by Llama-3 (int32), a 400-piece and a 300-piece
    SentencePiece model (both uint16)."""
    import sentencepiece

    root = tmp_path_factory.mktemp("small_sets")
    corpus = root / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in doc_records[:12]))
    (root / "spm.txt").write_text("\n".join(r["text"] for r in doc_records[:40]), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(root / "spm.txt"), model_prefix=str(root / "spm300"), vocab_size=300,
        model_type="bpe", bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    tokenizers = {"llama": llama3_model, "spm400": sentencepiece_model,
                  "spm300": str(root / "spm300.model")}
    for name, tokenizer in tokenizers.items():
        preprocess([str(corpus)], str(root / name), tokenizer, PreprocessOptions(progress=False))
    return root


def _files(folder):
    return sorted(os.listdir(folder))


def test_preprocess_records_the_tokenizer_and_the_largest_id(sample_datasets, llama3):
    for name in ("docs", "code"):  # code: grouped by repository
        summary = read_summary(sample_datasets[name])
        tokens = IndexedReader(sample_datasets[name]).tokens
        assert summary["max_token_id"] == int(tokens.max()) == llama3.eos_id
        recorded = summary["tokenizer"]
        assert (recorded["kind"], recorded["file"], recorded["vocab_size"],
                recorded["vocabulary_fingerprint"]) == (
            "tiktoken", "tokenizer.model", 128256, llama3.vocabulary_fingerprint())


def test_merge_refuses_datasets_of_different_tokenizers_naming_both(tmp_path, small_sets):
    llama, spm400, spm300 = (str(small_sets / n) for n in ("llama", "spm400", "spm300"))
    with pytest.raises(MixedTokenizersError) as error:
        merge_datasets([llama, spm400], str(tmp_path / "m"))
    message = str(error.value)
    assert f"input 1 ({llama}) and input 2 ({spm400})" in message
    assert "token dtype int32 vs uint16" in message
    assert "tokenizer tiktoken tokenizer.model (128,256 ids" in message
    assert "sentencepiece tiny.model (400 ids" in message
    assert "re-run `lce-data preprocess`" in message
    # Same dtype (uint16), other vocabulary: only the summaries can tell.
    with pytest.raises(MixedTokenizersError, match=r"input 1 .* and input 2 .*: tokenizer "
                                                   r"sentencepiece tiny.model \(400 ids.* vs "
                                                   r"sentencepiece spm300.model \(300 ids"):
        merge_datasets([spm400, spm300], str(tmp_path / "m"))
    assert _files(tmp_path) == []


def test_merge_accepts_one_vocabulary_in_two_file_formats_and_records_it(tmp_path, small_sets,
                                                                         doc_records, llama3_dir,
                                                                         llama3):
    corpus = str(small_sets / "docs.jsonl")
    preprocess([corpus], str(tmp_path / "hf"), _without_image_token(llama3_dir, tmp_path / "tok"),
               PreprocessOptions(progress=False))
    assert read_summary(str(tmp_path / "hf"))["tokenizer"]["kind"] == "huggingface"
    summary = merge_datasets([str(small_sets / "llama"), str(tmp_path / "hf")],
                             str(tmp_path / "both"))
    merged = IndexedReader(str(tmp_path / "both"))
    assert read_summary(str(tmp_path / "both")) == summary
    assert summary["tokenizer"]["vocabulary_fingerprint"] == llama3.vocabulary_fingerprint()
    assert summary["max_token_id"] == int(merged.tokens.max()) == llama3.eos_id
    assert summary["documents"] == len(merged) == 24


def test_the_shipped_tokenizer_json_and_tokenizer_model_are_one_tokenizer_to_the_data_tools(
        tmp_path, small_sets, llama3_dir, llama3_model, llama3):
    """Data of the shipped tokenizer.json (128,257 ids: <|image|> beyond tokenizer.model's
    range) merges with data of tokenizer.model and is inspected with either file; data of a
    rank file with two ranks swapped (same size) is refused by merge and inspect."""
    corpus = str(small_sets / "docs.jsonl")
    preprocess([corpus], str(tmp_path / "json"), llama3_dir, PreprocessOptions(progress=False))
    assert read_summary(str(tmp_path / "json"))["tokenizer"]["vocab_size"] == 128257
    summary = merge_datasets([str(small_sets / "llama"), str(tmp_path / "json")],
                             str(tmp_path / "both"))
    assert summary["tokenizer"]["vocabulary_fingerprint"] == llama3.vocabulary_fingerprint()
    for tokenizer in (llama3_model, llama3_dir):
        assert inspect_document(str(tmp_path / "json"), 0, tokenizer)["text"] == (
            inspect_document(str(small_sets / "llama"), 0, llama3_model)["text"])
    swapped = _swapped_ranks(llama3_model, tmp_path / "swapped.model")
    preprocess([corpus], str(tmp_path / "swapped"), swapped, PreprocessOptions(progress=False))
    with pytest.raises(MixedTokenizersError, match=r"tokenizer tiktoken tokenizer.model .* vs "
                                                   r"tiktoken swapped.model .* \(regular "
                                                   r"vocabulary sha256:\w+ vs sha256:\w+: text "
                                                   r"encodes to other ids\)"):
        merge_datasets([str(small_sets / "llama"), str(tmp_path / "swapped")],
                       str(tmp_path / "mixed"))
    with pytest.raises(MixedTokenizersError, match="its ids would decode as other tokens"):
        inspect_document(str(tmp_path / "swapped"), 0, llama3_dir)


def test_datasets_without_a_summary_are_compared_by_dtype_alone(tmp_path, small_sets):
    import shutil

    for name in ("llama", "spm300"):
        for suffix in (".bin", ".idx"):  # as Megatron's preprocess_data.py leaves them
            shutil.copy(small_sets / (name + suffix), tmp_path / (name + "_bare" + suffix))
    spm400, bare300 = str(small_sets / "spm400"), str(tmp_path / "spm300_bare")
    summary = merge_datasets([spm400, bare300], str(tmp_path / "m"))
    assert summary["tokenizer"] is None  # one input's tokenizer is unknown
    expected = np.concatenate([IndexedReader(spm400).tokens, IndexedReader(bare300).tokens])
    assert summary["max_token_id"] == int(expected.max())
    with pytest.raises(MixedTokenizersError, match=r"token dtype uint16 vs int32"):
        merge_datasets([spm400, str(tmp_path / "llama_bare")], str(tmp_path / "n"))
    assert not any(name.startswith("n.") for name in _files(tmp_path))


def test_mix_refuses_sources_of_different_tokenizers_and_writes_nothing(tmp_path, small_sets):
    sources = [{"name": "llama", "path": "llama", "weight": 0.5},
               {"name": "small", "path": "spm400", "weight": 0.5}]
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", 256, sources),
                         data_root=str(small_sets))
    with pytest.raises(RecipeError) as error:
        build_mixture(recipe, str(tmp_path / "packed"), log=lambda *_: None)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'r.yaml'}: source 'llama' ({small_sets / 'llama'}) "
                              f"and source 'small' ({small_sets / 'spm400'})")
    assert "token dtype int32 vs uint16" in message and "Mix only datasets of one" in message
    assert _files(tmp_path) == ["r.yaml"]


def test_mix_records_the_tokenizer_and_the_largest_id(tmp_path, sample_datasets, llama3):
    sources = [{"name": "code", "path": "code", "weight": 0.6, "long": True},
               {"name": "docs", "path": "docs", "weight": 0.4}]
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", 2048, sources),
                         data_root=sample_datasets["root"])
    metadata = build_mixture(recipe, str(tmp_path / "packed"), log=lambda *_: None)
    dataset = PackedDataset(str(tmp_path / "packed"))
    in_sequences = max(int(dataset[i].tokens.max()) for i in range(len(dataset)))
    in_sources = max(int(IndexedReader(sample_datasets[n]).tokens.max()) for n in ("code", "docs"))
    assert metadata["max_token_id"] == dataset.max_token_id == in_sequences == in_sources
    assert metadata["tokenizer"]["vocabulary_fingerprint"] == llama3.vocabulary_fingerprint()
    # A source without a summary (Megatron-made) has its .bin read for its largest id.
    for suffix in (".bin", ".idx"):
        os.link(sample_datasets["docs"] + suffix, str(tmp_path / ("bare" + suffix)))
    bare = load_recipe(write_recipe(tmp_path / "b.yaml", 2048, [{"path": "bare", "weight": 1}]),
                       data_root=str(tmp_path))
    metadata = build_mixture(bare, str(tmp_path / "bare_packed"), log=lambda *_: None)
    assert metadata["tokenizer"] is None
    assert metadata["max_token_id"] == int(IndexedReader(sample_datasets["docs"]).tokens.max())


def test_sft_records_the_largest_id_padding_included(tmp_path, llama3_model):
    metadata = build_sft([SAMPLE_CHAT], str(tmp_path / "sft"), llama3_model, 2048,
                         log=lambda *_: None)
    dataset = PackedDataset(str(tmp_path / "sft"))
    largest = max(int(dataset[i].tokens.max()) for i in range(len(dataset)))
    assert metadata["max_token_id"] == dataset.max_token_id == largest == 128009  # <|eot_id|>
    assert metadata["padding_tokens"] > 0


def test_a_packed_dataset_from_before_max_token_id_reports_none(tmp_path, llama3_model):
    build_sft([SAMPLE_CHAT], str(tmp_path / "sft"), llama3_model, 2048, log=lambda *_: None)
    path = tmp_path / "sft" / METADATA_FILE
    metadata = json.loads(path.read_text())
    del metadata["max_token_id"]
    path.write_text(json.dumps(metadata))
    assert PackedDataset(str(tmp_path / "sft")).max_token_id is None
