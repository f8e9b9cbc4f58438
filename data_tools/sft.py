"""Chat JSON lines -> Llama-3 chat tokens with an assistant-only loss mask, packed to L tokens.

Each record holds a list of {"role", "content"} messages. A conversation is rendered as
    <|begin_of_text|> then, per message,
    <|start_header_id|>ROLE<|end_header_id|>\\n\\nCONTENT<|eot_id|>
with CONTENT stripped of surrounding whitespace (as Llama-3's own template does). The loss mask
is 1 on each assistant message's CONTENT tokens and its <|eot_id|>, 0 elsewhere.

Packing (`pack_whole`): whole conversations per sequence, padded to L with the tokenizer's pad
id (loss 0). A conversation that does not fit the open sequence starts the next one by default
(`overflow="move"`, nothing lost); `overflow="drop"` applies ProLong's SFT rule instead: the
conversation is dropped and the sequence closed. Conversations longer than L are dropped and
counted either way.
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Sequence

import numpy as np

from data_tools.indexed import IndexedReader, IndexedWriter, token_dtype
from data_tools.inputs import BadRecord, InputError, iter_records, list_input_files, read_chunks
from data_tools.outputs import (NO_RECORDS_REASON, all_skipped_reason, check_output_location,
                               empty_output_error)
from data_tools.packed import staging_folder, write_packed
from data_tools.packing import pack_whole
from data_tools.tokenizer import TextTokenizer, load_tokenizer

ROLES = ("system", "user", "assistant", "ipython", "tool")
CHAT_SPECIALS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def check_messages(record: dict, key: str, path: str, line: int):
    """The message list of a record, or a BadRecord saying what is wrong with it."""
    messages = record.get(key)
    if not isinstance(messages, list) or not messages:
        return None, BadRecord(path, line, f"{key!r} must be a non-empty list of "
                                           f"{{role, content}} messages",
                               "fix the record, set --messages-key, or pass --skip-bad")
    for n, message in enumerate(messages):
        if (not isinstance(message, dict) or message.get("role") not in ROLES
                or not isinstance(message.get("content"), str)):
            return None, BadRecord(path, line, f"message {n} is not {{role: one of {ROLES}, "
                                               f"content: string}}: {str(message)[:80]}")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return None, BadRecord(path, line, "no assistant message with content (nothing to learn)")
    return messages, None


class ChatEncoder:
    """Llama-3 chat template over any tokenizer that has Llama-3's special tokens."""

    def __init__(self, tokenizer: TextTokenizer):
        try:
            ids = [tokenizer.token_id(t) for t in CHAT_SPECIALS]
        except KeyError as missing:
            raise ValueError(f"tokenizer {tokenizer.path} has no {missing} token; SFT data uses "
                             f"Llama-3's chat template, so use Llama-3's tokenizer") from None
        self.tokenizer = tokenizer
        self.bos, self.start_header, self.end_header, self.eot = ids
        self.blank_line = tokenizer.encode("\n\n")

    def encode(self, messages: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
        """(token ids int64, loss mask uint8) of one conversation."""
        texts = []
        for m in messages:
            texts += [m["role"], m["content"].strip()]
        encoded = self.tokenizer.encode_batch(texts)
        ids, mask = [self.bos], [0]
        for n, message in enumerate(messages):
            role, content = encoded[2 * n], encoded[2 * n + 1]
            header = [self.start_header, *role, self.end_header, *self.blank_line]
            learn = 1 if message["role"] == "assistant" else 0
            ids += header
            mask += [0] * len(header)
            ids += [*content, self.eot]
            mask += [learn] * (len(content) + 1)
        return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8)


def build_sft(inputs: Sequence[str], output: str, tokenizer_path: str, seq_length: int,
              overflow: str = "move", seed: int = 0, skip_bad: bool = False,
              messages_key: str = "messages", log=print, allow_empty: bool = False) -> dict:
    """Tokenize chat records and pack them into the packed dataset folder `output`.

    Returns the metadata (conversations kept, dropped as too long / overflowing, tokens,
    loss tokens, padding tokens, skipped lines, the largest token id). Raises ValueError for a
    seq_length or seed out of range, OutputError for an output that cannot be written,
    InputError on the first bad record unless skip_bad, and EmptyOutputError when no sequence
    would be written unless allow_empty; nothing is written then.
    """
    if isinstance(seq_length, bool) or not isinstance(seq_length, (int, np.integer)) \
            or seq_length < 1:
        raise ValueError(f"--seq-length {seq_length!r}: give a positive number of tokens per "
                         f"sequence, e.g. --seq-length 65536")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"--seed {seed!r}: give a whole number >= 0")
    check_output_location(output, "--output")
    start = time.perf_counter()
    files = list_input_files(inputs)
    tokenizer = load_tokenizer(tokenizer_path)
    encoder = ChatEncoder(tokenizer)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    staging = staging_folder(output)
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    skipped, bad_records = 0, []
    tokens = IndexedWriter(os.path.join(staging, "conversations"), token_dtype(tokenizer.vocab_size))
    masks = IndexedWriter(os.path.join(staging, "conversations.mask"), np.uint8)
    try:
        for path in files:
            for chunk in read_chunks(path, [messages_key]):
                for line, record, problem in iter_records(chunk):
                    if problem is None:
                        if isinstance(record, str):
                            problem = BadRecord(path, line, "a plain-text file is not chat data",
                                                "give JSON lines or Parquet with messages")
                        else:
                            messages, problem = check_messages(record, messages_key, path, line)
                    if problem is not None:
                        if not skip_bad:
                            raise InputError(problem)
                        skipped += 1
                        bad_records.append(problem.as_dict())
                        continue
                    ids, mask = encoder.encode(messages)
                    tokens.add_documents(ids, [len(ids)])
                    masks.add_documents(mask, [len(mask)])
        tokens.finalize()
        masks.finalize()
        lengths = np.asarray(IndexedReader(os.path.join(staging, "conversations")).lengths)
        rng = np.random.default_rng(seed)
        shuffled = rng.permutation(len(lengths))
        packed = pack_whole(lengths[shuffled], seq_length, overflow)
        too_long = int((lengths > seq_length).sum())
        loss_tokens = int(IndexedReader(os.path.join(staging, "conversations.mask"))
                          .tokens.sum(dtype=np.int64))
        kept_tokens = int(packed.starts[-1])
        if len(packed.sequences) == 0 and not allow_empty:
            _refuse_empty(files, lengths, skipped, bad_records, seq_length)
        info = {"name": "sft", "prefix": "conversations", "mask_prefix": "conversations.mask",
                "weight": 1.0, "conversations": int(len(lengths)),
                "conversations_packed": int(len(packed.kept)),
                "dropped_too_long": too_long,
                "dropped_overflow": packed.dropped_documents - too_long,
                "tokens_dropped": packed.dropped_tokens}
        num_sequences = len(packed.sequences)
        padding = num_sequences * seq_length - kept_tokens
        # Conversations dropped as too long count too: one tokenizer wrote them all.
        largest = tokens.max_token_id
        if padding and (largest is None or pad_id > largest):
            largest = int(pad_id)
        metadata = {
            "recipe": "sft", "seq_length": seq_length, "seed": seed, "overflow": overflow,
            "num_sequences": num_sequences, "total_tokens": num_sequences * seq_length,
            "pad_id": int(pad_id), "tokens_per_source": {"sft": kept_tokens},
            "padding_tokens": padding, "max_token_id": largest,
            "loss_tokens_in_input": loss_tokens, "skipped_lines": skipped,
            "bad_records": bad_records[:100], "tokenizer": tokenizer.describe(),
            "inputs": [os.path.abspath(p) for p in inputs],
            "build_seconds": round(time.perf_counter() - start, 3),
        }
        order = np.stack([np.zeros(num_sequences, np.int64), np.arange(num_sequences)], axis=1)
        write_packed(output, metadata, [(info, shuffled, packed)], order, staging=staging)
    except BaseException:
        tokens.abort()
        masks.abort()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"packed {info['conversations_packed']:,} of {info['conversations']:,} conversations "
        f"into {num_sequences:,} sequences of {seq_length:,} tokens in {output} "
        f"(dropped: {too_long} too long, {info['dropped_overflow']} overflowing; "
        f"{skipped} bad lines skipped)")
    return {**metadata, "sources": [info]}


def _refuse_empty(files: Sequence[str], lengths: np.ndarray, skipped: int, bad_records: list,
                  seq_length: int) -> None:
    if len(lengths):
        why = (f"all conversations ({len(lengths):,}) are longer than --seq-length "
               f"{seq_length:,} tokens (the shortest has {int(lengths.min()):,}); raise "
               f"--seq-length")
    elif skipped:
        why = all_skipped_reason(skipped, bad_records[0])
    else:
        why = NO_RECORDS_REASON
    raise empty_output_error("sequence", files, why)
