"""Tokenizer loading: tiktoken (Llama-3 tokenizer.model), Hugging Face folders, SentencePiece."""
import json
import os

import pytest

from data_tools.tokenizer import TokenizerError, load_tokenizer


def test_tiktoken_llama3_matches_the_hugging_face_tokenizer(llama3_dir, llama3, doc_records,
                                                            code_records):
    hf = load_tokenizer(llama3_dir)
    assert (hf.kind, llama3.kind) == ("huggingface", "tiktoken")
    texts = [r["text"] for r in doc_records[:20]] + [r["text"] for r in code_records[:10]]
    assert llama3.encode_batch(texts) == hf.encode_batch(texts)
    assert (llama3.vocab_size, llama3.bos_id, llama3.eos_id) == (128256, 128000, 128001)
    assert (hf.bos_id, hf.eos_id) == (128000, 128001)


def test_llama3_special_tokens_match_tokenizer_json(llama3_dir, llama3):
    with open(os.path.join(llama3_dir, "tokenizer.json"), encoding="utf-8") as f:
        # Llama-3.2's tokenizer.json adds <|image|> (128256) for vision models beyond the 256.
        added = {t["content"]: t["id"] for t in json.load(f)["added_tokens"] if t["id"] < 128256}
    assert len(llama3.specials) == 256
    assert llama3.specials == added
    assert llama3.token_id("<|eot_id|>") == 128009


def test_special_token_text_in_raw_documents_stays_text(llama3):
    ids = llama3.encode("a<|eot_id|>b")
    assert 128009 not in ids and llama3.decode(ids) == "a<|eot_id|>b"


def test_sentencepiece_model(sentencepiece_model):
    sp = load_tokenizer(sentencepiece_model)
    assert sp.kind == "sentencepiece" and sp.vocab_size == 400
    assert (sp.bos_id, sp.eos_id) == (1, 2)
    ids = sp.encode("An identifier occurring as an atom is a name.")
    assert len(ids) > 5 and sp.decode(ids) == "An identifier occurring as an atom is a name."


def test_wrong_tokenizer_paths_name_the_path(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.model"))
    bogus = tmp_path / "bogus.model"
    bogus.write_bytes(b"\x00\x01 not a model")
    with pytest.raises(TokenizerError, match="bogus.model"):
        load_tokenizer(str(bogus))
    with pytest.raises(TokenizerError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(str(tmp_path))
