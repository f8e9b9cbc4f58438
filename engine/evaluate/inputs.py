"""Checks of engine.evaluate's inputs that need no model and no process group: the depth flag,
the lengths against the models' context, the documents of the loss measures, Hugging Face
folders (config.json and the safetensors files it comes with), and the tokenizer and data
against the one each checkpoint was trained with. Each raises EvaluationError
naming the input, the value and the fix."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from data_tools.indexed import IndexedReader
from data_tools.jsonfile import read_json_object
from data_tools.stats import recorded_tokenizer
from data_tools.summary import describe_tokenizer, tokenizer_difference
from data_tools.tokenizer import TextTokenizer, TokenizerError, load_tokenizer
from engine.evaluate.errors import EvaluationError

# Recall and loss are measured up to this many times the longest context a model was trained
# for: far beyond it a measure says nothing of the model, and a haystack of any length is
# built in memory before the first forward pass.
CONTEXT_MULTIPLE_LIMIT = 8

# Short documents are those below the position length, or this many tokens without one.
SHORT_LENGTH = 4096


def depth_setting(values: Sequence[float]) -> Union[int, list[float]]:
    """--depths as the config's eval.depths: one whole number >= 1 is a count of depths swept
    over [0, 1]; anything else is a list of fractions in [0, 1]."""
    if len(values) == 1 and values[0] >= 1:
        if not float(values[0]).is_integer():
            raise EvaluationError(f"--depths {values[0]:g}: one value of 1 or more is a count of "
                                  f"depths; give a whole count (e.g. 5) or fractions in [0, 1] "
                                  f"(e.g. 0.25 0.5 0.75)")
        return int(values[0])
    outside = [v for v in values if not 0 <= v <= 1]
    if outside:
        raise EvaluationError(f"--depths {' '.join(f'{v:g}' for v in values)}: {outside[0]:g} "
                              f"is not a depth in [0, 1]; give fractions in [0, 1] or one count")
    return list(values)


def check_lengths(lengths: Sequence[int], position_length: int,
                  contexts: dict[str, Optional[int]]) -> None:
    """Refuse a recall length or position length beyond CONTEXT_MULTIPLE_LIMIT x the longest
    trained context among ``contexts`` ({target name: max_position_embeddings or None})."""
    known = {name: c for name, c in contexts.items() if c}
    if not known:
        return
    name, context = max(known.items(), key=lambda item: item[1])
    limit = CONTEXT_MULTIPLE_LIMIT * context
    for flag, value in [("--lengths", v) for v in lengths] + [("--position-length",
                                                                position_length)]:
        if value > limit:
            raise EvaluationError(
                f"{flag} {value} is beyond {CONTEXT_MULTIPLE_LIMIT} x the longest context the "
                f"models were trained for ({name}: {context} tokens): give lengths up to {limit} "
                f"(evaluation that long also needs the memory for it: raise "
                f"parallel.context_parallel for long prompts)")


# The command's flags; the training config names the same settings eval.long_documents, ...
FLAGS = {"long_documents": "--long-documents", "short_documents": "--short-documents",
         "position_length": "--position-length", "lengths": "--lengths",
         "tokenizer": "--tokenizer"}
SETTINGS = {name: f"eval.{name}" for name in FLAGS}


def long_document_ids(reader: IndexedReader, prefix: str, length: int, max_documents: int,
                      names: dict = FLAGS) -> list[int]:
    """The documents the loss by position reads, or an error if none is long enough."""
    chosen = [int(i) for i in np.flatnonzero(reader.lengths >= length)[:max_documents]]
    if not chosen:
        longest = int(reader.lengths.max()) if len(reader.lengths) else 0
        raise EvaluationError(
            f"{names['long_documents']} {prefix}: no document holds "
            f"{names['position_length']} {length} tokens (the longest of its "
            f"{len(reader.lengths)} holds {longest}): lower {names['position_length']} to at "
            f"most {longest} or give longer documents")
    return chosen


def short_document_ids(reader: IndexedReader, prefix: str, limit: int, max_documents: int,
                       names: dict = FLAGS) -> list[int]:
    """The documents the short-document loss reads (2 <= tokens < ``limit``), or an error."""
    lengths = reader.lengths
    chosen = [int(i) for i in np.flatnonzero((lengths < limit) & (lengths >= 2))[:max_documents]]
    if not chosen:
        shortest = int(lengths.min()) if len(lengths) else 0
        raise EvaluationError(
            f"{names['short_documents']} {prefix}: no document of 2 to {limit - 1} tokens (its "
            f"{len(lengths)} documents hold {shortest} or more): give shorter documents, or a "
            f"larger {names['position_length']}, which sets the limit")
    return chosen


def hf_config(folder: str) -> dict:
    """config.json of Hugging Face folder ``folder``, with an int vocab_size."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise EvaluationError(f"--hf {folder}: no config.json there: not a Hugging Face model "
                              f"folder; export one with `python -m engine.convert export`")
    config = read_json_object(path, "export the folder again",
                              lambda message: EvaluationError(f"--hf {folder}: {message}"))
    vocab = config.get("vocab_size")
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise EvaluationError(f"--hf {folder}: {path} has vocab_size {vocab!r}, not a positive "
                              f"whole number; add the model's vocab_size or export it again")
    context = config.get("max_position_embeddings")
    if context is not None and (isinstance(context, bool) or not isinstance(context, int)
                                or context < 1):
        raise EvaluationError(f"--hf {folder}: {path} has max_position_embeddings {context!r}; "
                              f"give a positive whole number or export the folder again")
    _check_safetensors(folder)
    return config


def _check_safetensors(folder: str) -> None:
    """Every weight file is there and as long as its header says (a copy cut short fails here,
    not after the engine checkpoints were evaluated)."""
    root = Path(folder)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
            raise EvaluationError(f"--hf {folder}: {index} is not a safetensors index "
                                  f"({error!r}); export the folder again") from None
    else:
        files = sorted(p.name for p in root.glob("*.safetensors"))
    if not files and not any(root.glob("*.bin")):
        raise EvaluationError(f"--hf {folder}: no weights there (*.safetensors or *.bin); "
                              f"export the folder again")
    for name in files:
        _check_safetensors_file(folder, root / name)


def _check_safetensors_file(folder: str, path: Path) -> None:
    if not path.is_file():
        raise EvaluationError(f"--hf {folder}: {path.name} is listed in the index but missing; "
                              f"copy or export the folder again")
    size = path.stat().st_size
    problem = None
    with open(path, "rb") as f:
        prefix = f.read(8)
        header_size = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
        if header_size is None or 8 + header_size > size:
            problem = "its header is cut short"
        else:
            try:
                header = json.loads(f.read(header_size))
                end = max([int(entry["data_offsets"][1]) for key, entry in header.items()
                           if key != "__metadata__"], default=0)
            except (ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError,
                    AttributeError):
                problem = "its header is not safetensors JSON"
            else:
                if 8 + header_size + end > size:
                    problem = (f"it holds {size} bytes, its header describes "
                               f"{8 + header_size + end}")
    if problem:
        raise EvaluationError(f"--hf {folder}: {path.name} is damaged ({problem}): copy or "
                              f"export the folder again")


def tokenizer_inputs(section, names: dict, tokenizer: Optional[TextTokenizer] = None,
                     ) -> dict[str, Optional[dict]]:
    """The tokenizer records of what evaluation feeds a model, by setting and value: the
    tokenizer's (``tokenizer``: already loaded), and those recorded by the indexed datasets of
    the long and short documents and of the haystack. ``names``: FLAGS or SETTINGS."""
    inputs = {}
    if section.tokenizer:
        tokenizer = tokenizer or load_tokenizer(section.tokenizer)
        inputs[f"{names['tokenizer']} {section.tokenizer}"] = tokenizer.describe()
    haystack = names["tokenizer"].replace("tokenizer", "haystack")  # --haystack, eval.haystack
    for name, prefix in ((names["long_documents"], section.long_documents),
                         (names["short_documents"], section.short_documents),
                         (haystack, section.haystack)):
        if isinstance(prefix, str) and prefix and Path(prefix + ".idx").exists():
            inputs[f"{name} {prefix}"] = recorded_tokenizer(prefix)
    return inputs


def folder_tokenizer(folder: str) -> Optional[dict]:
    """The record of a Hugging Face folder's own tokenizer files (what its model's ids mean);
    None when the folder holds none."""
    try:
        return load_tokenizer(folder).describe()
    except TokenizerError:
        return None


def check_recorded_tokenizers(checkpoints: dict[str, Optional[dict]],
                              inputs: dict[str, Optional[dict]],
                              trained: str = "was trained with") -> None:
    """Raise EvaluationError when an input's tokenizer gives other ids than the one a checkpoint
    was trained with (data_tools.summary.tokenizer_difference: one vocabulary in two file
    formats is one tokenizer). ``checkpoints``: {"--checkpoint NAME (PATH)": its recorded
    tokenizer}; ``inputs``: {"--tokenizer PATH" or "--long-documents PREFIX": its tokenizer
    record} (tokenizer_inputs); None where nothing is recorded (written before records were
    kept), which passes, noted."""
    for target, saved in checkpoints.items():
        if not saved:
            if any(inputs.values()):
                print(f"note: {target} records no tokenizer; not checked that "
                      f"{', '.join(what for what, record in inputs.items() if record)} "
                      f"match it", flush=True)
            continue
        for what, record in inputs.items():
            difference = record and tokenizer_difference(record, saved)
            if difference:
                raise EvaluationError(
                    f"{what} is tokenizer {describe_tokenizer(record)}, but {target} {trained} "
                    f"tokenizer {describe_tokenizer(saved)} ({difference}): give the tokenizer "
                    f"of {target}, and data tokenized by it")
