"""Tokenizers from local files only: tiktoken BPE (Llama-3), Hugging Face tokenizer.json, SentencePiece.

`load_tokenizer(path)` picks the kind from the file itself:
- a directory or file holding tokenizer.json -> Hugging Face `tokenizers` (Rust);
- a text file of "base64-token rank" lines (Llama-3's tokenizer.model) -> tiktoken, with
  Llama-3's 256 special tokens numbered from the end of the BPE ranks (128000+); its encoder is
  splintr (Rust, with a bounded pre-token cache, 1.6-3x tiktoken's speed and the same ids) when
  the package is installed, else tiktoken (LCE_BPE_ENCODER=tiktoken forces tiktoken);
- any other file -> a SentencePiece model (Llama-2's tokenizer.model).
A directory holding only tokenizer.model is read as that file. Nothing is ever downloaded.
"""
from __future__ import annotations

import base64
import hashlib
import itertools
import os
import re
import struct
from typing import Optional, Sequence

import numpy as np

from data_tools.jsonfile import read_json_object

# Llama-3's pre-tokenizer regular expression (the same in tokenizer.json and Meta's tokenizer.py).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL_TOKENS = 256
# Llama-3's tokenizer.model holds 128,000 BPE ranks: ids 0-127,999, specials from 128,000.
LLAMA3_NUM_BPE_RANKS = 128_000
# Named special tokens by offset from the first special id; every other offset is reserved.
_LLAMA3_NAMED_SPECIALS = {
    0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>", 5: "<|step_id|>",
    6: "<|start_header_id|>", 7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>",
    10: "<|python_tag|>",
}


def llama3_special_tokens(first_id: int) -> dict[str, int]:
    """Llama-3's special tokens, named as in Llama-3.2's tokenizer.json, from `first_id` (128000)."""
    specials = {}
    reserved = 0
    for offset in range(LLAMA3_NUM_SPECIAL_TOKENS):
        name = _LLAMA3_NAMED_SPECIALS.get(offset)
        if name is None:
            name = f"<|reserved_special_token_{reserved}|>"
            reserved += 1
        specials[name] = first_id + offset
    return specials


class TokenizerError(ValueError):
    """A tokenizer path that cannot be loaded; the message names the path and the fix."""


class TextTokenizer:
    """Common interface: `encode_batch` (no special tokens added), `decode`, special ids."""

    kind = "base"

    def __init__(self, path: str):
        self.path = path
        self.vocabulary_file = path  # the file that defines the ids (tokenizer.json in a folder)
        self.vocab_size = 0
        self.bos_id: Optional[int] = None
        self.eos_id: Optional[int] = None
        self.pad_id: Optional[int] = None

    def encode_batch(self, texts: Sequence[str]) -> list[Sequence[int]]:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        return list(self.encode_batch([text])[0])

    def encode_batch_flat(self, texts: Sequence[str], dtype=np.int32) -> tuple[np.ndarray, np.ndarray]:
        """(ids of all documents back to back, per-document lengths), no special tokens added."""
        return flatten_token_lists(self.encode_batch(texts) if texts else [], dtype=dtype)

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def token_id(self, token: str) -> int:
        """Id of a special token such as "<|eot_id|>"; KeyError if this vocabulary lacks it."""
        raise NotImplementedError

    def token_bytes(self) -> list[Optional[bytes]]:
        """The bytes of every id, 0 .. vocab_size - 1 (a special token: its name in UTF-8; an
        id without a token: None). What the vocabulary fingerprints hash."""
        raise NotImplementedError

    def special_tokens(self) -> dict[str, int]:
        """Every special token (name -> id): ids that text never encodes to, only markup such
        as BOS or a chat template puts into data. The regular vocabulary is every other id."""
        raise NotImplementedError

    def vocabulary_fingerprint(self) -> str:
        """"sha256:" + 16 hex digits of the regular vocabulary (every id that is not a special
        token, with its bytes): what decides which ids text encodes to, whatever the file
        format. The rest of the rule (special tokens, BOS/EOS) is in
        data_tools.summary.tokenizer_difference."""
        return self._vocabulary()["vocabulary_fingerprint"]

    def _vocabulary(self) -> dict:
        """The vocabulary fields of describe(); cached per file (size and mtime), as reading a
        vocabulary takes 0.1-0.5 s."""
        stat = os.stat(self.vocabulary_file)
        key = (os.path.abspath(self.vocabulary_file), stat.st_size, stat.st_mtime_ns, self.kind)
        if key not in _VOCABULARIES:
            table = self.token_bytes()
            specials = self.special_tokens()
            _VOCABULARIES[key] = vocabulary_record(
                _digest(table, exclude=set(specials.values())), specials,
                legacy=_digest(table, with_ids=False))
        return _VOCABULARIES[key]

    def describe(self) -> dict:
        """What a dataset or checkpoint records of its tokenizer (compared by
        data_tools.summary.tokenizer_difference)."""
        return {"kind": self.kind, "path": os.path.abspath(self.path),
                "file": os.path.basename(self.vocabulary_file),
                "vocab_size": self.vocab_size, "bos_id": self.bos_id, "eos_id": self.eos_id,
                **self._vocabulary()}


_VOCABULARIES: dict[tuple, dict] = {}
# The fingerprint rule records carry (data_tools.summary.tokenizer_difference). Records without
# "fingerprint_version" were written before it: their "vocabulary_fingerprint" hashes the whole
# id -> token table, special tokens included, so one extra added token changes it.
FINGERPRINT_VERSION = 2
# Llama-3's unused special tokens. Their names differ between files of one vocabulary (id 128004
# is <|reserved_special_token_2|> in Llama-3's, <|finetune_right_pad_id|> in Llama-3.1's, and
# this module names tokenizer.model's ids as Llama-3.2 does), and no data holds them by name:
# records leave them out, so only named special tokens are compared.
PLACEHOLDER_TOKEN = re.compile(r"<\|reserved_special_token_\d+\|>")


def _digest(table: Sequence[Optional[bytes]], exclude: frozenset | set = frozenset(),
            with_ids: bool = True) -> str:
    """"sha256:" + 16 hex digits of ``table``'s tokens but those at ``exclude``d ids, each with
    its id (``with_ids``: so that leaving ids out cannot shift others into their place), or
    (the digest of records before version 2) every id in order, an empty one marked."""
    digest = hashlib.sha256()
    for token_id, token in enumerate(table):
        if with_ids:
            if token is not None and token_id not in exclude:
                digest.update(struct.pack("<II", token_id, len(token)) + token)
        else:
            digest.update(struct.pack("<I", 0xFFFFFFFF) if token is None
                          else struct.pack("<I", len(token)) + token)
    return "sha256:" + digest.hexdigest()[:16]


def vocabulary_record(fingerprint: str, specials: dict[str, int], legacy: str) -> dict:
    """The vocabulary fields of a tokenizer record: the regular vocabulary's fingerprint, the
    named special tokens (placeholders left out) and ``legacy``, the digest records before
    version 2 carry, to compare with them."""
    named = {name: int(token_id) for name, token_id in sorted(specials.items(),
                                                              key=lambda item: item[1])
             if not PLACEHOLDER_TOKEN.fullmatch(name)}
    return {"vocabulary_fingerprint": fingerprint, "fingerprint_version": FINGERPRINT_VERSION,
            "special_tokens": named, "vocabulary_fingerprint_v1": legacy}


# Meta's Llama-3 tokenizer.model (128,000 BPE ranks; 256 special tokens from 128000): its
# regular vocabulary's fingerprint, and the digest that records before version 2 carry for it.
# What data tokenized with Llama-3 records when its tokenizer file is not at hand (lce-data
# import-mds without --tokenizer), so that it still compares to datasets whose records name it.
LLAMA3_VOCABULARY_FINGERPRINT = "sha256:a0353bd671a1cf77"
LLAMA3_VOCABULARY_FINGERPRINT_V1 = "sha256:72ded992a5c809fa"


def llama3_vocabulary() -> dict:
    """The vocabulary fields of Llama-3's tokenizer.model's record, without the file."""
    return vocabulary_record(LLAMA3_VOCABULARY_FINGERPRINT,
                             llama3_special_tokens(LLAMA3_NUM_BPE_RANKS),
                             LLAMA3_VOCABULARY_FINGERPRINT_V1)


def tokenizer_fingerprint(path: str) -> str:
    """The vocabulary fingerprint of the tokenizer at ``path`` (file or folder; see
    TextTokenizer.vocabulary_fingerprint): what datasets record and what checkpoints, training
    and evaluation can compare with a dataset's (data_tools.summary.tokenizer_difference)."""
    return load_tokenizer(path).vocabulary_fingerprint()


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (used by Llama-3's tokenizer.json): the character that
    stands for each byte 0-255 -> that byte. Printable Latin-1 bytes stand for themselves; the
    others are numbered from U+0100 in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    alphabet, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            alphabet[chr(byte)] = byte
        else:
            alphabet[chr(0x100 + shifted)] = byte
            shifted += 1
    return alphabet


ENCODER_ENV = "LCE_BPE_ENCODER"


class TiktokenTokenizer(TextTokenizer):
    kind = "tiktoken"

    def __init__(self, path: str, num_ranks: int):
        super().__init__(path)
        self.specials = llama3_special_tokens(num_ranks)
        self.vocab_size = num_ranks + len(self.specials)
        self.bos_id = self.specials["<|begin_of_text|>"]
        self.eos_id = self.specials["<|end_of_text|>"]
        self.pad_id = self.specials["<|finetune_right_pad_id|>"]
        self.num_threads = 1
        self._tiktoken = None
        self._splintr = None
        choice = os.environ.get(ENCODER_ENV, "auto")
        if choice not in ("auto", "splintr", "tiktoken"):
            raise TokenizerError(f"{ENCODER_ENV}={choice!r}; use auto, splintr or tiktoken")
        if choice != "tiktoken":
            try:
                import splintr
            except ImportError:
                if choice == "splintr":
                    raise TokenizerError(f"{ENCODER_ENV}=splintr but the splintr-rs package is not "
                                         f"installed; pip install splintr-rs") from None
            else:
                # Built without special tokens, so "<|eot_id|>" inside raw text stays plain text,
                # exactly like tiktoken's encode_ordinary.
                self._splintr = splintr.Tokenizer(path, LLAMA3_SPLIT_PATTERN)
        self.encoder = "splintr" if self._splintr is not None else "tiktoken"

    @property
    def _encoding(self):
        # tiktoken also decodes and encodes chat templates' special tokens; built on first use so
        # that a preprocessing worker running splintr never pays its ~0.3 s load.
        if self._tiktoken is None:
            import tiktoken

            self._tiktoken = tiktoken.Encoding(
                name=f"tiktoken:{os.path.basename(self.path)}", pat_str=LLAMA3_SPLIT_PATTERN,
                mergeable_ranks=_read_tiktoken_ranks(self.path), special_tokens=self.specials)
        return self._tiktoken

    def encode_batch(self, texts):
        # Special-token strings inside raw text stay plain text (encode_ordinary): a web page
        # that contains "<|eot_id|>" must not end a turn.
        if self._splintr is not None:
            return [self._splintr.encode_ordinary(t) for t in texts]
        if len(texts) == 1 or self.num_threads == 1:
            return [self._encoding.encode_ordinary(t) for t in texts]
        return self._encoding.encode_ordinary_batch(list(texts), num_threads=self.num_threads)

    def encode_batch_flat(self, texts, dtype=np.int32):
        if self._splintr is None or not texts:
            return super().encode_batch_flat(texts, dtype)
        # encode_flat hands back the ids as little-endian uint32 bytes: no Python int per token.
        # One document at a time, on this thread: encode_batch_flat would start a thread per core
        # in every worker process.
        parts = [np.frombuffer(self._splintr.encode_flat(t), dtype="<u4") for t in texts]
        lengths = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
        return np.concatenate(parts).astype(dtype, copy=False), lengths

    def decode(self, ids):
        return self._encoding.decode([int(i) for i in ids])

    def token_id(self, token):
        return self.specials[token]

    def token_bytes(self):
        table: list[Optional[bytes]] = [None] * self.vocab_size
        for token, rank in _read_tiktoken_ranks(self.path).items():
            table[rank] = token
        for name, token_id in self.specials.items():
            table[token_id] = name.encode("utf-8")
        return table

    def special_tokens(self):
        return dict(self.specials)

    def describe(self):
        return {**super().describe(), "encoder": self.encoder}


class HFTokenizer(TextTokenizer):
    kind = "huggingface"

    def __init__(self, path: str, tokenizer_json: str):
        from tokenizers import Tokenizer

        super().__init__(path)
        self.vocabulary_file = tokenizer_json
        try:
            self._tok = Tokenizer.from_file(tokenizer_json)
        except Exception as error:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise TokenizerError(
                f"{tokenizer_json} cannot be read as a Hugging Face tokenizer.json "
                f"({str(error)[:200]}): the file is damaged or not a tokenizer; download the "
                f"model's tokenizer.json again or pass its tokenizer.model") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config_path = os.path.join(os.path.dirname(tokenizer_json), "tokenizer_config.json")
        config = {}
        if os.path.exists(config_path):
            config = read_json_object(config_path, "download it again or remove it (it names "
                                      "the BOS/EOS tokens)", TokenizerError)
        self.bos_id = self._special_from_config(config.get("bos_token"))
        self.eos_id = self._special_from_config(config.get("eos_token"))
        self.pad_id = self._special_from_config(config.get("pad_token"))

    def _special_from_config(self, entry) -> Optional[int]:
        if isinstance(entry, dict):
            entry = entry.get("content")
        return self._tok.token_to_id(entry) if entry else None

    def encode_batch(self, texts):
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids):
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_id(self, token):
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise KeyError(token)
        return token_id

    def token_bytes(self):
        vocabulary = self._tok.get_vocab(with_added_tokens=True)
        table: list[Optional[bytes]] = [None] * max(self.vocab_size, max(vocabulary.values()) + 1)
        added = set(self._tok.get_added_tokens_decoder())
        decoder = self._tok.decoder
        # A byte-level vocabulary spells bytes with stand-in characters; added tokens are plain.
        byte_level = decoder is not None and b'"ByteLevel"' in decoder.__getstate__()
        alphabet = _byte_level_alphabet() if byte_level else {}
        for token, token_id in vocabulary.items():
            if byte_level and token_id not in added and all(c in alphabet for c in token):
                table[token_id] = bytes(alphabet[c] for c in token)
            else:
                table[token_id] = token.encode("utf-8")
        return table

    def special_tokens(self):
        # Added tokens not marked special are split out of text as they are: regular ids.
        return {token.content: token_id
                for token_id, token in self._tok.get_added_tokens_decoder().items()
                if token.special}


class SentencePieceTokenizer(TextTokenizer):
    kind = "sentencepiece"

    def __init__(self, path: str):
        import sentencepiece

        super().__init__(path)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as error:
            raise TokenizerError(
                f"{path} is neither a tokenizer.json, a tiktoken BPE file nor a SentencePiece "
                f"model ({error}); pass a Hugging Face tokenizer folder, Llama-3's "
                f"tokenizer.model or a SentencePiece .model") from None
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
        self.num_threads = 1

    def encode_batch(self, texts):
        return self._sp.encode(list(texts), out_type=int, num_threads=self.num_threads)

    def decode(self, ids):
        return self._sp.decode([int(i) for i in ids])

    def token_bytes(self):
        return [self._sp.id_to_piece(i).encode("utf-8") for i in range(self.vocab_size)]

    def special_tokens(self):
        # Control pieces (<s>, </s>) are never produced from text; <unk> and user-defined
        # pieces are.
        return {self._sp.id_to_piece(i): i for i in range(self.vocab_size)
                if self._sp.is_control(i)}

    def token_id(self, token):
        token_id = self._sp.piece_to_id(token)
        if token_id == self._sp.unk_id() and token != self._sp.id_to_piece(token_id):
            raise KeyError(token)
        return token_id


def _tiktoken_rank_count(path: str) -> Optional[int]:
    """The number of BPE ranks if `path` is a tiktoken file ("base64 rank" per line), else None.

    Only the first line is parsed: the ranks themselves are read by whichever encoder needs them.
    """
    with open(path, "rb") as f:
        head = f.read(256)
    first = head.split(b"\n", 1)[0].split()
    if len(first) != 2 or not first[1].isdigit():
        return None
    try:
        base64.b64decode(first[0], validate=True)
    except ValueError:
        return None
    with open(path, "rb") as f:
        return sum(1 for line in f.read().split(b"\n") if line.strip())


def _read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


def bpe_ranks_beside(tokenizer_json_folder: str) -> Optional[str]:
    """Llama-3's BPE rank file (tokenizer.model, or original/tokenizer.model as Meta's Hugging
    Face repositories ship it) next to a tokenizer.json, if there is one."""
    folder = (tokenizer_json_folder if os.path.isdir(tokenizer_json_folder)
              else os.path.dirname(tokenizer_json_folder))
    for candidate in (os.path.join(folder, "tokenizer.model"),
                      os.path.join(folder, "original", "tokenizer.model")):
        if os.path.isfile(candidate) and _tiktoken_rank_count(candidate) is not None:
            return candidate
    return None


def load_tokenizer(path: str) -> TextTokenizer:
    """Load a tokenizer from a local file or folder (see the module docstring for the rules)."""
    if not path or not os.path.exists(path):
        raise TokenizerError(
            f"tokenizer path {path!r} does not exist; pass a folder with tokenizer.json, "
            f"Llama-3's tokenizer.model (tiktoken) or a SentencePiece .model file")
    if os.path.isdir(path):
        for name in ("tokenizer.json", "tokenizer.model"):
            candidate = os.path.join(path, name)
            if os.path.exists(candidate):
                if name == "tokenizer.json":
                    return HFTokenizer(path, candidate)
                return load_tokenizer(candidate)
        raise TokenizerError(f"folder {path!r} holds neither tokenizer.json nor tokenizer.model")
    if path.endswith(".json"):
        return HFTokenizer(path, path)
    num_ranks = _tiktoken_rank_count(path)
    if num_ranks is not None:
        return TiktokenTokenizer(path, num_ranks)
    return SentencePieceTokenizer(path)


def flatten_token_lists(token_lists: Sequence[Sequence[int]], dtype=np.int32) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate per-document token lists into (flat ids, lengths) numpy arrays."""
    lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
    flat = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=dtype,
                       count=int(lengths.sum()))
    return flat, lengths
