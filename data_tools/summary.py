"""PREFIX.summary.json, written beside each dataset by `lce-data preprocess` and `merge`, and the
check that datasets combined by `merge` and `mix` hold tokens of one tokenizer.

A summary records the tokenizer (`TextTokenizer.describe()`: kind, file, vocabulary size and a
fingerprint of its id -> token table) and the largest token id written. Datasets without a
summary (written by Megatron's preprocess_data.py, say) are compared by token dtype alone.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from data_tools.outputs import write_failure
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


def same_tokenizer(a: dict, b: dict) -> bool:
    """Whether two tokenizer records assign the same ids: equal vocabulary fingerprints (the
    file format and path may differ); records written before fingerprints by vocabulary size."""
    if a.get("vocab_size") != b.get("vocab_size"):
        return False
    if a.get("vocabulary_fingerprint") and b.get("vocabulary_fingerprint"):
        return a["vocabulary_fingerprint"] == b["vocabulary_fingerprint"]
    return True


def check_one_tokenizer(datasets: Sequence[DatasetTokens], command: str) -> Optional[dict]:
    """Raise MixedTokenizersError naming the first two of `datasets` whose token dtypes or
    tokenizers differ. Returns the common tokenizer record, or None when some dataset has no
    summary (its tokenizer is then unknown; only its dtype was compared)."""
    for i, first in enumerate(datasets):
        for other in datasets[i + 1:]:
            differences = []
            if first.dtype != other.dtype:
                differences.append(f"token dtype {first.dtype} vs {other.dtype}")
            if first.tokenizer and other.tokenizer and not same_tokenizer(first.tokenizer,
                                                                          other.tokenizer):
                differences.append(f"tokenizer {describe_tokenizer(first.tokenizer)} vs "
                                   f"{describe_tokenizer(other.tokenizer)}")
            if differences:
                raise MixedTokenizersError(
                    f"{first.label} ({first.prefix}) and {other.label} ({other.prefix}) hold "
                    f"tokens of different tokenizers: {'; '.join(differences)}. {command} "
                    f"only datasets of one tokenizer: re-run `lce-data preprocess` for one of "
                    f"them with the other's --tokenizer")
    if all(d.tokenizer for d in datasets):
        return datasets[0].tokenizer
    return None
