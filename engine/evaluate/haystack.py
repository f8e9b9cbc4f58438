"""Haystacks for the recall suite, as token ids: RULER's repeated noise, or the user's documents.

A haystack hands out windows of exactly `n` tokens, `Haystack.window(n, rng) -> HaystackWindow`,
that also list the offsets where a needle may go: right after a sentence end (a token ending in
".", "!" or "?" followed by a token that starts with a space) or after a newline. Documents are
joined by a blank line, so every document start is such an offset too.

- `NoiseHaystack(tokenizer)`: RULER's noise paragraph ("The grass is green. The sky is blue. ...")
  one per line, repeated; unlimited.
- `DocumentHaystack.from_indexed(prefix, tokenizer)`: an indexed dataset written by
  `lce-data preprocess`; its token ids are used as they are (no decoding and re-encoding), after
  checking that its tokenizer (PREFIX.summary.json) has this tokenizer's vocabulary. BOS/EOS ids
  are dropped, documents are separated by the tokens of "\\n\\n".
- `DocumentHaystack.from_text_files(paths, tokenizer)`: text files (or folders of them, walked
  recursively), one file = one document, tokenized once when loaded.
- `load_haystack(source, tokenizer)`: "noise", an indexed-dataset prefix, a folder, or text files.

A window of documents starts at a document chosen by `rng` and takes the documents after it in
order (wrapping around, none twice); a haystack smaller than the window raises EvaluationError.
Only numpy and data_tools are imported.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np

from data_tools.indexed import IndexedReader, idx_path
from data_tools.inputs import list_input_files
from data_tools.tokenizer import TextTokenizer
from engine.evaluate.errors import EvaluationError

# RULER's noise haystack (NVIDIA, arXiv 2404.06654): this paragraph, one copy per line.
NOISE_TEXT = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
              "There and back again.")
DOCUMENT_SEPARATOR = "\n\n"
_SENTENCE_ENDS = (".", "!", "?")
_CLOSERS = "\"')]\u201d\u2019"


@dataclass
class HaystackWindow:
    """`ids` (int32 [n]); `boundaries` (int64, sorted, in [0, n]): offsets where a needle may be
    inserted; `after_newline` (bool per boundary): the token before it ends a line, so the
    needle goes in as a line of its own rather than as a sentence after a space."""
    ids: np.ndarray
    boundaries: np.ndarray
    after_newline: np.ndarray


class TokenKinds:
    """Per-token facts used to find insertion points, computed once per distinct id and cached:
    ends a line, ends a sentence, starts with whitespace."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        # Decoding a token after a fixed one keeps its leading space (SentencePiece drops a
        # leading space when a token is decoded alone).
        self._ref = list(tokenizer.encode("a"))[-1:]
        self._ref_text = tokenizer.decode(self._ref)
        self._cache: dict[int, tuple[bool, bool, bool]] = {}

    def _kinds_of(self, token: int) -> tuple[bool, bool, bool]:
        text = self.tokenizer.decode(self._ref + [token])[len(self._ref_text):]
        tail = text.rsplit("\n", 1)
        ends_line = len(tail) == 2 and not tail[1].strip()
        ends_sentence = text.rstrip().rstrip(_CLOSERS).endswith(_SENTENCE_ENDS)
        starts_space = text[:1].isspace()
        return ends_line, ends_sentence, starts_space

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ends_line, ends_sentence, starts_space), bool arrays shaped like `ids`."""
        unique, inverse = np.unique(ids, return_inverse=True)
        table = np.zeros((len(unique), 3), dtype=bool)
        for row, token in enumerate(unique.tolist()):
            kinds = self._cache.get(token)
            if kinds is None:
                kinds = self._cache[token] = self._kinds_of(token)
            table[row] = kinds
        per_token = table[inverse.reshape(-1)]
        return per_token[:, 0], per_token[:, 1], per_token[:, 2]

    def window(self, ids: np.ndarray) -> HaystackWindow:
        """`ids` with their insertion points; offset 0 counts as the start of a line (the
        instructions before a context end with a newline)."""
        ends_line, ends_sentence, starts_space = self.lookup(ids)
        next_starts_space = np.append(starts_space[1:], True)
        after = ends_line | (ends_sentence & next_starts_space)
        offsets = np.flatnonzero(after) + 1
        boundaries = np.concatenate([[0], offsets]).astype(np.int64)
        after_newline = np.concatenate([[True], ends_line[offsets - 1]])
        return HaystackWindow(np.ascontiguousarray(ids, dtype=np.int32), boundaries, after_newline)


class Haystack:
    """A source of haystack windows bound to one tokenizer."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        self.kinds = TokenKinds(tokenizer)

    def window(self, num_tokens: int, rng: np.random.Generator, purpose: str = "") -> HaystackWindow:
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError


class NoiseHaystack(Haystack):
    """RULER's noise paragraph, one copy per line, cut to the window length."""

    def __init__(self, tokenizer: TextTokenizer):
        super().__init__(tokenizer)
        self.line_ids = np.asarray(tokenizer.encode(NOISE_TEXT + "\n"), dtype=np.int32)

    def window(self, num_tokens, rng, purpose=""):
        copies = -(-num_tokens // len(self.line_ids))
        return self.kinds.window(np.tile(self.line_ids, copies)[:num_tokens])

    def describe(self):
        return {"kind": "noise", "text": NOISE_TEXT}


class DocumentHaystack(Haystack):
    """Documents as token-id arrays; see the module docstring for how windows are cut."""

    def __init__(self, tokenizer: TextTokenizer, documents, source: str, kind: str):
        super().__init__(tokenizer)
        self.documents = documents  # a sequence of 1-D integer arrays (or an IndexedReader)
        self.source = source
        self.kind = kind
        self.separator = np.asarray(tokenizer.encode(DOCUMENT_SEPARATOR), dtype=np.int32)
        self._specials = np.array([t for t in (tokenizer.bos_id, tokenizer.eos_id) if t is not None],
                                  dtype=np.int64)
        if len(documents) == 0:
            raise EvaluationError(f"haystack {source!r} holds no documents; give a dataset or "
                                  f"text files with text in them, or use the noise haystack")
        lengths = (documents.lengths if isinstance(documents, IndexedReader)
                   else np.array([len(d) for d in documents]))
        self.capacity = int(np.sum(lengths, dtype=np.int64)) + len(self.separator) * (len(lengths) - 1)

    @classmethod
    def from_indexed(cls, prefix: str, tokenizer: TextTokenizer) -> "DocumentHaystack":
        """An indexed dataset (PREFIX.bin/.idx from `lce-data preprocess`), its ids used as-is."""
        try:
            reader = IndexedReader(prefix)
        except (FileNotFoundError, ValueError) as error:
            raise EvaluationError(f"haystack {prefix!r}: {error}") from None
        summary_path = prefix + ".summary.json"
        if os.path.exists(summary_path):
            with open(summary_path, encoding="utf-8") as f:
                recorded = json.load(f).get("tokenizer", {})
            vocab = recorded.get("vocab_size")
            if vocab is not None and vocab != tokenizer.vocab_size:
                raise EvaluationError(
                    f"haystack {prefix!r} was tokenized with {recorded.get('path')!r} "
                    f"({vocab:,} tokens, {summary_path}), but the evaluation tokenizer "
                    f"{tokenizer.path!r} has {tokenizer.vocab_size:,}; pass the tokenizer the "
                    f"dataset was made with, or re-run `lce-data preprocess` with this one")
        return cls(tokenizer, reader, prefix, "indexed")

    @classmethod
    def from_text_files(cls, paths: Sequence[str], tokenizer: TextTokenizer) -> "DocumentHaystack":
        """Text files, or folders of them (recursively, sorted, hidden files skipped)."""
        try:
            files = list_input_files(paths)
        except FileNotFoundError as error:
            raise EvaluationError(f"haystack: {error}; give text files or a folder of them") from None
        texts = []
        for file in files:
            with open(file, "rb") as f:
                raw = f.read()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise EvaluationError(f"haystack file {file}: invalid UTF-8 at byte {error.start}; "
                                      f"re-encode it as UTF-8 or leave it out") from None
            if text.strip():
                texts.append(text)
        flat, lengths = tokenizer.encode_batch_flat(texts) if texts else (np.zeros(0, np.int32), [])
        documents = np.split(flat, np.cumsum(lengths)[:-1]) if len(texts) else []
        return cls(tokenizer, documents, ",".join(paths), "text")

    def window(self, num_tokens, rng, purpose=""):
        if num_tokens > self.capacity:
            raise EvaluationError(
                f"haystack {self.source!r} holds {self.capacity:,} tokens in "
                f"{len(self.documents):,} documents, but {purpose or 'the window'} needs "
                f"{num_tokens:,} haystack tokens; give more documents, a shorter length, "
                f"or the noise haystack")
        first = int(rng.integers(len(self.documents)))
        pieces, total = [], 0
        for step in range(len(self.documents)):
            doc = np.asarray(self.documents[(first + step) % len(self.documents)])
            if self._specials.size:
                doc = doc[~np.isin(doc, self._specials)]
            if step:
                pieces.append(self.separator)
                total += len(self.separator)
            pieces.append(doc)
            total += len(doc)
            if total >= num_tokens:
                break
        ids = np.concatenate(pieces)[:num_tokens].astype(np.int64)
        if len(ids) < num_tokens:  # BOS/EOS dropped from the documents
            raise EvaluationError(
                f"haystack {self.source!r} holds {len(ids):,} tokens without BOS/EOS, but "
                f"{purpose or 'the window'} needs {num_tokens:,}; give more documents")
        if ids.size and (ids.min() < 0 or ids.max() >= self.tokenizer.vocab_size):
            raise EvaluationError(
                f"haystack {self.source!r} holds token id {int(ids.max())}, outside the "
                f"tokenizer's {self.tokenizer.vocab_size:,}-token vocabulary; it was made with "
                f"another tokenizer: pass that one, or re-run `lce-data preprocess`")
        return self.kinds.window(ids)

    def describe(self):
        return {"kind": self.kind, "source": self.source, "documents": len(self.documents),
                "tokens": self.capacity}


def load_haystack(source: Union[str, Sequence[str], None], tokenizer: TextTokenizer) -> Haystack:
    """"noise" (or None) -> NoiseHaystack; an indexed-dataset prefix (PREFIX.idx exists) ->
    DocumentHaystack.from_indexed; a folder, a text file or a list of them -> from_text_files."""
    if source is None or source == "noise":
        return NoiseHaystack(tokenizer)
    paths = [source] if isinstance(source, str) else list(source)
    if len(paths) == 1 and os.path.exists(idx_path(paths[0])):
        return DocumentHaystack.from_indexed(paths[0], tokenizer)
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise EvaluationError(
            f"haystack {missing[0]!r} does not exist; give 'noise', the prefix of an indexed "
            f"dataset (PREFIX.bin/.idx from `lce-data preprocess`), a folder or text files")
    return DocumentHaystack.from_text_files(paths, tokenizer)

