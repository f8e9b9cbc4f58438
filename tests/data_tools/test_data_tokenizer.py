"""Tokenizer loading: tiktoken (Llama-3 tokenizer.model), Hugging Face folders, SentencePiece."""
import json
import os
import random

import numpy as np
import pytest

from data_tools.summary import same_tokenizer, tokenizer_difference
from data_tools.tokenizer import (ENCODER_ENV, LLAMA3_VOCABULARY_FINGERPRINT_V1, TokenizerError,
                                  load_tokenizer)


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


def _hf_copy(llama3_dir, folder, edit_json=None, edit_config=None):
    """A copy of the shipped tokenizer.json and tokenizer_config.json, each edited in place."""
    os.makedirs(folder, exist_ok=True)
    for name, edit in (("tokenizer.json", edit_json), ("tokenizer_config.json", edit_config)):
        with open(os.path.join(llama3_dir, name), encoding="utf-8") as f:
            data = json.load(f)
        if edit is not None:
            edit(data)
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            json.dump(data, f)
    return str(folder)


def _without_image_token(llama3_dir, folder):
    """A copy of the shipped tokenizer.json (Llama-3.2 with the vision model's extra id 128256,
    <|image|>) without that token: then it assigns exactly the ids of tokenizer.model."""
    return _hf_copy(llama3_dir, folder, lambda data: data.update(
        added_tokens=[t for t in data["added_tokens"] if t["content"] != "<|image|>"]))


def _swapped_ranks(llama3_model, path):
    """A copy of the rank file with one pair of ranks swapped: same size, other ids."""
    with open(llama3_model, "rb") as f:
        lines = f.read().split(b"\n")
    (a, rank_a), (b, rank_b) = lines[1000].split(), lines[1001].split()
    lines[1000], lines[1001] = a + b" " + rank_b, b + b" " + rank_a
    path.write_bytes(b"\n".join(lines))
    return str(path)


def test_vocabulary_fingerprint_follows_the_ids_not_the_file_format(tmp_path, llama3_dir, llama3,
                                                                   llama3_model,
                                                                   sentencepiece_model):
    """The shipped tokenizer.json (Llama-3.2 with the vision model's extra id 128256,
    <|image|>) and tokenizer.model encode text to the same ids with the same special tokens:
    one fingerprint, the same tokenizer, whichever file a dataset or checkpoint recorded."""
    fingerprint = llama3.vocabulary_fingerprint()
    assert fingerprint.startswith("sha256:") and len(fingerprint) == 7 + 16
    shipped_json = load_tokenizer(llama3_dir)
    assert (shipped_json.vocab_size, llama3.vocab_size) == (128257, 128256)
    assert shipped_json.vocabulary_fingerprint() == fingerprint
    assert shipped_json.special_tokens()["<|image|>"] == 128256
    assert tokenizer_difference(shipped_json.describe(), llama3.describe()) is None
    assert tokenizer_difference(llama3.describe(), shipped_json.describe()) is None
    # Without <|image|> the two assign every id the same token.
    same_ids = load_tokenizer(_without_image_token(llama3_dir, tmp_path / "hf"))
    assert same_ids.token_bytes() == llama3.token_bytes()
    assert same_ids.vocabulary_fingerprint() == fingerprint
    assert load_tokenizer(sentencepiece_model).vocabulary_fingerprint() != fingerprint
    swapped = load_tokenizer(_swapped_ranks(llama3_model, tmp_path / "swapped.model"))
    assert swapped.vocab_size == llama3.vocab_size
    assert swapped.vocabulary_fingerprint() != fingerprint
    assert tokenizer_difference(swapped.describe(), llama3.describe()) == (
        f"regular vocabulary {swapped.vocabulary_fingerprint()} vs {fingerprint}: text encodes "
        f"to other ids")
    described = llama3.describe()
    assert (described["kind"], described["file"], described["vocab_size"],
            described["vocabulary_fingerprint"], described["fingerprint_version"]) == (
        "tiktoken", "tokenizer.model", 128256, fingerprint, 2)
    # Placeholders (<|reserved_special_token_N|>) are not recorded: their names differ between
    # Llama-3 and Llama-3.1+ files of one vocabulary.
    assert described["special_tokens"] == {
        "<|begin_of_text|>": 128000, "<|end_of_text|>": 128001,
        "<|finetune_right_pad_id|>": 128004, "<|step_id|>": 128005,
        "<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eom_id|>": 128008,
        "<|eot_id|>": 128009, "<|python_tag|>": 128010}
    assert same_tokenizer(described, {**described, "vocab_size": 128257})


def _renamed(data, old, new):
    for token in data["added_tokens"]:
        if token["content"] == old:
            token["content"] = new


def test_a_tokenizer_with_other_bos_eos_or_special_ids_is_refused(tmp_path, llama3_dir, llama3):
    """The same regular vocabulary, but a special token that data holds at another id: refused,
    naming what differs."""
    reference = llama3.describe()
    other_bos = load_tokenizer(_hf_copy(llama3_dir, tmp_path / "bos", edit_config=lambda c: (
        c.update(bos_token="<|end_of_text|>"))))
    assert other_bos.vocabulary_fingerprint() == reference["vocabulary_fingerprint"]
    assert tokenizer_difference(other_bos.describe(), reference) == "BOS id 128001 vs 128000"

    def swap_eot_eom(data):  # <|eot_id|> at 128008, <|eom_id|> at 128009
        _renamed(data, "<|eot_id|>", "<swap>")
        _renamed(data, "<|eom_id|>", "<|eot_id|>")
        _renamed(data, "<swap>", "<|eom_id|>")
    swapped = load_tokenizer(_hf_copy(llama3_dir, tmp_path / "eot", swap_eot_eom))
    assert swapped.vocabulary_fingerprint() == reference["vocabulary_fingerprint"]
    assert tokenizer_difference(swapped.describe(), reference) in (
        "<|eom_id|> at id 128009 vs 128008", "<|eot_id|> at id 128008 vs 128009")
    # A named token moved onto an id the other record leaves to a placeholder.
    moved = load_tokenizer(_hf_copy(llama3_dir, tmp_path / "moved", lambda data: (
        _renamed(data, "<|eot_id|>", "<|reserved_special_token_900|>"),
        _renamed(data, "<|reserved_special_token_3|>", "<|eot_id|>"))))
    assert moved.special_tokens()["<|eot_id|>"] == 128012
    assert tokenizer_difference(moved.describe(), reference) == (
        "<|eot_id|> at id 128012 vs 128009")
    # Another name at an id both name.
    renamed = load_tokenizer(_hf_copy(llama3_dir, tmp_path / "renamed", lambda data: _renamed(
        data, "<|python_tag|>", "<|tool_call|>")))
    assert tokenizer_difference(renamed.describe(), reference) == (
        "id 128010 is <|tool_call|> vs <|python_tag|>")


def test_records_before_fingerprint_version_2_stay_comparable(llama3, llama3_dir):
    """A record written before version 2 carries the digest of the whole id -> token table:
    compared with a newer record by that digest, which newer records carry too; Llama-3's
    tokenizer.model's old digest stands for its version-2 fields, so such data compares with
    the tokenizer.json of the same ids."""
    old_fields = ("kind", "path", "file", "vocab_size", "bos_id", "eos_id")
    new = llama3.describe()
    old = {key: new[key] for key in old_fields}
    assert new["vocabulary_fingerprint_v1"] == LLAMA3_VOCABULARY_FINGERPRINT_V1
    old_llama3 = {**old, "vocabulary_fingerprint": LLAMA3_VOCABULARY_FINGERPRINT_V1}
    shipped_json = load_tokenizer(llama3_dir).describe()
    assert tokenizer_difference(old_llama3, new) is None
    assert tokenizer_difference(old_llama3, shipped_json) is None
    # Another old digest: compared with the newer record's own old digest.
    old_json = {**{key: shipped_json[key] for key in old_fields},
                "vocabulary_fingerprint": shipped_json["vocabulary_fingerprint_v1"]}
    assert tokenizer_difference(old_json, shipped_json) is None
    assert tokenizer_difference({**old_json, "vocabulary_fingerprint": "sha256:0123456789abcdef"},
                                shipped_json) == (
        f"id -> token table sha256:0123456789abcdef vs "
        f"{shipped_json['vocabulary_fingerprint_v1']} (a record written before fingerprint "
        f"version 2)")
    # No digest at all (before fingerprints): by vocabulary size.
    assert tokenizer_difference(old, new) is None
    assert tokenizer_difference({**old, "vocab_size": 32000}, new) == "32000 vs 128256 ids"
