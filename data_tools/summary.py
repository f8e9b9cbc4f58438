"""PREFIX.summary.json, written beside each dataset by `lce-data preprocess` and `merge`, and the
check that datasets combined by `merge` and `mix` hold tokens of one tokenizer.

A summary records the tokenizer (`TextTokenizer.describe()`: kind, file, vocabulary size, BOS/EOS,
a fingerprint of its regular vocabulary and its named special tokens; `tokenizer_difference` says
when two records give data other ids) and the largest token id written. Datasets without a
summary (written by Megatron's preprocess_data.py, say) are compared by token dtype alone.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from data_tools.outputs import write_failure
from data_tools.tokenizer import (FINGERPRINT_VERSION, LLAMA3_VOCABULARY_FINGERPRINT_V1,
                                  llama3_vocabulary)
from publishing.atomic import discard, temporary_path, write_text_atomically

from data_tools.indexed import IndexedReader

SUMMARY_SUFFIX = ".summary.json"


class MixedTokenizersError(ValueError):
    """Datasets of different tokenizers (or token dtypes) given to one merge or mix."""


def summary_path(prefix: str) -> str:
    return prefix + SUMMARY_SUFFIX


def read_summary(prefix: str) -> Optional[dict]:
    """The summary beside dataset `prefix`, or None if it has none."""
    path = summary_path(prefix)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); re-run `lce-data preprocess` for "
                         f"{prefix}, or delete the file to use the dataset unchecked") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{path} holds a JSON {type(summary).__name__}, not a summary object; "
                         f"re-run `lce-data preprocess` for {prefix} or delete the file")
    return summary


def write_summary(prefix: str, summary: dict) -> None:
    """Write PREFIX.summary.json under a temporary name, then rename it into place."""
    try:
        write_text_atomically(summary_path(prefix), json.dumps(summary, indent=2))
    except OSError as error:
        raise write_failure(summary_path(prefix), error) from None


def stage_summary(prefix: str, summary: dict) -> str:
    """Write PREFIX.summary.json's contents under its temporary name and return that name, for
    the caller to publish once the dataset's other files are in place."""
    staged = temporary_path(summary_path(prefix))
    try:
        with open(staged, "w", encoding="utf-8") as f:
            f.write(json.dumps(summary, indent=2))
    except OSError as error:
        discard(staged)
        raise write_failure(summary_path(prefix), error) from None
    return staged


def remove_stale_summary(prefix: str) -> None:
    """Delete a summary left by an earlier dataset at `prefix`, before a new one replaces it:
    a crash in between must not pair the new tokens with the old tokenizer record."""
    if os.path.exists(summary_path(prefix)):
        os.remove(summary_path(prefix))


@dataclass
class DatasetTokens:
    """What the tokens of one dataset are. `label` is how the user named it (a recipe source,
    a merge input); `tokenizer` is its summary's record, None without a summary."""
    label: str
    prefix: str
    dtype: str
    tokenizer: Optional[dict]
    max_token_id: Optional[int]
    has_summary: bool

    @classmethod
    def of(cls, prefix: str, label: Optional[str] = None,
           reader: Optional[IndexedReader] = None) -> "DatasetTokens":
        reader = reader or IndexedReader(prefix)
        summary = read_summary(prefix) or {}
        max_id = summary.get("max_token_id")
        return cls(label or prefix, prefix, np.dtype(reader.dtype).name,
                   summary.get("tokenizer"), None if max_id is None else int(max_id),
                   bool(summary))

    def largest_token_id(self) -> Optional[int]:
        """The recorded largest id, or (no summary, or one written before it was recorded) the
        largest id in the .bin, which reads the whole file."""
        if self.max_token_id is None:
            self.max_token_id = IndexedReader(self.prefix).largest_token_id()
        return self.max_token_id


def describe_tokenizer(record: dict) -> str:
    """One line for messages: "tiktoken tokenizer.model (128,256 ids, vocabulary sha256:...)"."""
    name = record.get("file") or os.path.basename(str(record.get("path", "?")))
    size = record.get("vocab_size")
    fingerprint = record.get("vocabulary_fingerprint", "not fingerprinted")
    size_text = f"{size:,}" if isinstance(size, int) else str(size)
    return f"{record.get('kind', '?')} {name} ({size_text} ids, vocabulary {fingerprint})"


def _comparable(record: dict) -> dict:
    """``record``, with the fields of version 2 when it predates them but names Llama-3's
    tokenizer.model by its old digest (what import-mds recorded without --tokenizer, and
    preprocess with that file): the one vocabulary whose old digest is known."""
    if (not record.get("fingerprint_version")
            and record.get("vocabulary_fingerprint") == LLAMA3_VOCABULARY_FINGERPRINT_V1):
        return {**record, **llama3_vocabulary()}
    return record


def tokenizer_difference(a: dict, b: dict) -> Optional[str]:
    """How two tokenizer records (TextTokenizer.describe()) differ in the ids they give data,
    None when they do not. Two records of version 2 (FINGERPRINT_VERSION) agree when
    - their regular vocabularies (every id that is not a special token, with its bytes) are
      equal: text encodes to the same ids;
    - the BOS and EOS ids are equal where both records know them;
    - the named special tokens both define agree: a name both define sits at the same id, an id
      both name carries the same name.
    The file format, the path, the vocabulary size and special tokens one record defines and
    the other does not (Llama-3.2's tokenizer.json lists <|image|> at 128256, beyond
    tokenizer.model's 128,256 ids) do not count: the model's vocabulary bounds the ids.
    A record written before version 2 carries a digest of its whole id -> token table (special
    tokens and size included): it is compared by that digest (a newer record carries its own as
    vocabulary_fingerprint_v1), and by vocabulary size where a record has no digest."""
    a, b = _comparable(a), _comparable(b)
    if a.get("fingerprint_version") == b.get("fingerprint_version") == FINGERPRINT_VERSION:
        if a["vocabulary_fingerprint"] != b["vocabulary_fingerprint"]:
            return (f"regular vocabulary {a['vocabulary_fingerprint']} vs "
                    f"{b['vocabulary_fingerprint']}: text encodes to other ids")
        for key, name in (("bos_id", "BOS"), ("eos_id", "EOS")):
            if None not in (a.get(key), b.get(key)) and a[key] != b[key]:
                return f"{name} id {a[key]} vs {b[key]}"
        special_a, special_b = a.get("special_tokens") or {}, b.get("special_tokens") or {}
        for name in special_a.keys() & special_b.keys():
            if special_a[name] != special_b[name]:
                return f"{name} at id {special_a[name]} vs {special_b[name]}"
        named_b = {token_id: name for name, token_id in special_b.items()}
        for name, token_id in special_a.items():
            if named_b.get(token_id, name) != name:
                return f"id {token_id} is {name} vs {named_b[token_id]}"
        return None
    if a.get("vocab_size") != b.get("vocab_size"):
        return f"{a.get('vocab_size')} vs {b.get('vocab_size')} ids"
    old_a, old_b = (record.get("vocabulary_fingerprint_v1") or record.get(
        "vocabulary_fingerprint") for record in (a, b))
    if old_a and old_b and old_a != old_b:
        return (f"id -> token table {old_a} vs {old_b} (a record written before fingerprint "
                f"version {FINGERPRINT_VERSION})")
    return None


def same_tokenizer(a: dict, b: dict) -> bool:
    """Whether two tokenizer records give data the same ids (see tokenizer_difference)."""
    return tokenizer_difference(a, b) is None


def check_one_tokenizer(datasets: Sequence[DatasetTokens], command: str) -> Optional[dict]:
    """Raise MixedTokenizersError naming the first two of `datasets` whose token dtypes or
    tokenizers differ. Returns the common tokenizer record, or None when some dataset has no
    summary (its tokenizer is then unknown; only its dtype was compared)."""
    for i, first in enumerate(datasets):
        for other in datasets[i + 1:]:
            differences = []
            if first.dtype != other.dtype:
                differences.append(f"token dtype {first.dtype} vs {other.dtype}")
            difference = (first.tokenizer and other.tokenizer
                          and tokenizer_difference(first.tokenizer, other.tokenizer))
            if difference:
                differences.append(f"tokenizer {describe_tokenizer(first.tokenizer)} vs "
                                   f"{describe_tokenizer(other.tokenizer)} ({difference})")
            if differences:
                raise MixedTokenizersError(
                    f"{first.label} ({first.prefix}) and {other.label} ({other.prefix}) hold "
                    f"tokens of different tokenizers: {'; '.join(differences)}. {command} "
                    f"only datasets of one tokenizer: re-run `lce-data preprocess` for one of "
                    f"them with the other's --tokenizer")
    if all(d.tokenizer for d in datasets):
        return datasets[0].tokenizer
    return None
