"""Tokenizer loading: tiktoken (Llama-3 tokenizer.model), Hugging Face folders, SentencePiece."""
import json
import os
import random
import shutil

import numpy as np
import pytest

from data_tools.tokenizer import ENCODER_ENV, TokenizerError, load_tokenizer


def test_tiktoken_llama3_matches_the_hugging_face_tokenizer(llama3_dir, llama3, doc_records,
                                                            code_records):
    hf = load_tokenizer(llama3_dir)
    assert (hf.kind, llama3.kind) == ("huggingface", "tiktoken")
    texts = [r["text"] for r in doc_records[:20]] + [r["text"] for r in code_records[:10]]
    assert llama3.encode_batch(texts) == hf.encode_batch(texts)
    assert (llama3.vocab_size, llama3.bos_id, llama3.eos_id) == (128256, 128000, 128001)
    assert (hf.bos_id, hf.eos_id) == (128000, 128001)


def _tricky_texts(count, seed=0):
    """Strings built from what BPE pre-tokenizers disagree on: contractions in any case, digit
    runs, whitespace kinds, combining marks, ZWJ emoji, scripts without case, special-token text."""
    pieces = [" ", "  ", "\n", "\r\n", "\t", "\u00a0", "\u3000", "'s", "'S", "'ll", "'LL", "123",
              "4567890", "\u00e9", "e\u0301", "\u65e5\u672c\u8a9e", "\ud55c\uad6d\uc5b4",
              "\U0001f642", "\U0001f469\u200d\U0001f469\u200d\U0001f467", "<|end_of_text|>",
              "<|eot_id|>", "Hello", "world", "--", "...", "\x00", "\u200b", "\u00df", "\u0130",
              "\ufb01", "\u03a9", "\u0663", "\r", "\x0b", "\x0c", "\u2028", "\u0085", "def f(x):"]
    rng = random.Random(seed)
    texts = []
    while len(texts) < count:
        text = "".join(rng.choice(pieces) if rng.random() < 0.8 else chr(rng.randint(32, 0x2FFFF))
                       for _ in range(rng.randint(1, 40)))
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: not text a corpus can hold
            continue
        texts.append(text)
    return texts


def test_splintr_and_tiktoken_encoders_give_the_same_ids(llama3_model, llama3, doc_records,
                                                         code_records, monkeypatch):
    # The preprocessing default (splintr) must be a pure speed-up: same ids as tiktoken and as
    # the Hugging Face tokenizer (checked above) on real documents and on adversarial strings.
    pytest.importorskip("splintr")
    monkeypatch.setenv(ENCODER_ENV, "tiktoken")
    slow = load_tokenizer(llama3_model)
    monkeypatch.setenv(ENCODER_ENV, "splintr")
    fast = load_tokenizer(llama3_model)
    assert (slow.encoder, fast.encoder) == ("tiktoken", "splintr")
    texts = ([r["text"] for r in doc_records] + [r["text"] for r in code_records]
             + _tricky_texts(3000))
    expected = slow.encode_batch(texts)
    assert fast.encode_batch(texts) == expected
    flat, lengths = fast.encode_batch_flat(texts)
    assert flat.dtype == np.int32 and lengths.tolist() == [len(ids) for ids in expected]
    assert flat.tolist() == [i for ids in expected for i in ids]
    assert fast.encode_batch_flat([])[0].size == 0
    assert fast.encode("a<|eot_id|>b") == slow.encode("a<|eot_id|>b")
    assert fast.decode(fast.encode(texts[-1])) == texts[-1]


def test_unknown_encoder_choice_is_refused(llama3_model, monkeypatch):
    monkeypatch.setenv(ENCODER_ENV, "fastest")
    with pytest.raises(TokenizerError, match="LCE_BPE_ENCODER='fastest'; use auto, splintr or tiktoken"):
        load_tokenizer(llama3_model)


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


def _without_image_token(llama3_dir, folder):
    """A copy of the shipped tokenizer.json (Llama-3.2 with the vision model's extra id 128256,
    <|image|>) without that token: then it assigns exactly the ids of tokenizer.model."""
    with open(os.path.join(llama3_dir, "tokenizer.json"), encoding="utf-8") as f:
        data = json.load(f)
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|image|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(data, f)
    shutil.copy(os.path.join(llama3_dir, "tokenizer_config.json"), folder)  # BOS/EOS names
    return str(folder)


def test_vocabulary_fingerprint_follows_the_ids_not_the_file_format(tmp_path, llama3_dir, llama3,
                                                                   llama3_model,
                                                                   sentencepiece_model):
    fingerprint = llama3.vocabulary_fingerprint()
    assert fingerprint.startswith("sha256:") and len(fingerprint) == 7 + 16
    shipped_json = load_tokenizer(llama3_dir)
    assert shipped_json.vocab_size == 128257  # + <|image|>: another vocabulary
    assert shipped_json.vocabulary_fingerprint() != fingerprint
    same_ids = load_tokenizer(_without_image_token(llama3_dir, tmp_path / "hf"))
    assert same_ids.token_bytes() == llama3.token_bytes()
    assert same_ids.vocabulary_fingerprint() == fingerprint
    assert load_tokenizer(sentencepiece_model).vocabulary_fingerprint() != fingerprint
    # One pair of ranks swapped in a copy of the rank file: same size, other ids.
    with open(llama3_model, "rb") as f:
        lines = f.read().split(b"\n")
    (a, rank_a), (b, rank_b) = lines[1000].split(), lines[1001].split()
    lines[1000], lines[1001] = a + b" " + rank_b, b + b" " + rank_a
    (tmp_path / "swapped.model").write_bytes(b"\n".join(lines))
    swapped = load_tokenizer(str(tmp_path / "swapped.model"))
    assert swapped.vocab_size == llama3.vocab_size
    assert swapped.vocabulary_fingerprint() != fingerprint
    described = llama3.describe()
    assert (described["kind"], described["file"], described["vocab_size"],
            described["vocabulary_fingerprint"]) == ("tiktoken", "tokenizer.model", 128256,
                                                     fingerprint)
