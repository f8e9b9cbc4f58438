"""sft: Llama-3 chat template, assistant-only loss mask, packing with boundaries and drops."""
import json
import os

import numpy as np
import pytest

from data_tools.packed_dataset import PackedDataset
from data_tools.sft import ChatEncoder, build_sft

SAMPLE_CHAT = os.path.join(os.path.dirname(__file__), "..", "..", "data_tools", "sample",
                           "chat.jsonl")


def test_template_and_mask_on_a_known_conversation(llama3):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "  Hello!  "}]
    ids, mask = ChatEncoder(llama3).encode(messages)
    text = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>")
    # tiktoken with special tokens allowed renders the reference ids of the whole template
    assert ids.tolist() == llama3._encoding.encode(text, allowed_special="all")
    learned = ids[mask == 1].tolist()
    assert learned == llama3.encode("Hello!") + [128009]
    assert mask.sum() == len(learned) and mask[:-len(learned)].sum() == 0


def test_sample_chat_packs_to_l_with_boundaries_and_masks(tmp_path, llama3, llama3_model):
    L = 2048
    metadata = build_sft([SAMPLE_CHAT], str(tmp_path / "sft"), llama3_model, L, log=lambda *_: None)
    ds = PackedDataset(str(tmp_path / "sft"))
    with open(SAMPLE_CHAT) as f:
        conversations = [json.loads(line)["messages"] for line in f]
    encoder = ChatEncoder(llama3)
    encoded = [encoder.encode(m) for m in conversations]
    too_long = sum(len(ids) > L for ids, _ in encoded)
    info = metadata["sources"][0]
    assert too_long > 0 and info["dropped_too_long"] == too_long
    assert info["conversations_packed"] == len(conversations) - too_long
    by_ids = {tuple(ids): mask for ids, mask in encoded}
    seen = 0
    for i in range(len(ds)):
        seq = ds[i]
        assert seq.tokens.shape == (L,) and seq.doc_lengths.sum() == L
        ends = np.cumsum(seq.doc_lengths)
        pad = L - int(ends[-2]) if len(ends) > 1 and seq.tokens[-1] == ds.pad_id else 0
        for n, end in zip(seq.doc_lengths[:len(seq.doc_lengths) - (pad > 0)], ends):
            piece = tuple(seq.tokens[end - n:end].tolist())
            assert piece in by_ids  # whole conversations only
            assert np.array_equal(seq.loss_mask[end - n:end], by_ids[piece])
            seen += 1
        if pad:
            assert np.all(seq.tokens[L - pad:] == 128004) and seq.loss_mask[L - pad:].sum() == 0
    assert seen == info["conversations_packed"]
    assert metadata["padding_tokens"] + metadata["tokens_per_source"]["sft"] == len(ds) * L


def test_drop_rule_drops_overflowing_conversations(tmp_path, llama3_model):
    move = build_sft([SAMPLE_CHAT], str(tmp_path / "m"), llama3_model, 4096, log=lambda *_: None)
    drop = build_sft([SAMPLE_CHAT], str(tmp_path / "d"), llama3_model, 4096, overflow="drop",
                     log=lambda *_: None)
    assert move["sources"][0]["dropped_overflow"] == 0
    assert drop["sources"][0]["dropped_overflow"] > 0
    assert (drop["sources"][0]["conversations_packed"] + drop["sources"][0]["dropped_overflow"]
            == move["sources"][0]["conversations_packed"])


def test_bad_chat_records(tmp_path, llama3_model):
    from data_tools.inputs import InputError

    path = tmp_path / "chat.jsonl"
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    lines = [good, {"messages": [{"role": "robot", "content": "x"}]},
             {"messages": [{"role": "user", "content": "only a question"}]}, {"text": "no"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(InputError, match=r"chat.jsonl:2: message 0 is not"):
        build_sft([str(path)], str(tmp_path / "o"), llama3_model, 64, log=lambda *_: None)
    assert not os.path.exists(tmp_path / "o")
    metadata = build_sft([str(path)], str(tmp_path / "o"), llama3_model, 64, skip_bad=True,
                         log=lambda *_: None)
    assert metadata["skipped_lines"] == 3
    assert [r["line"] for r in metadata["bad_records"]] == [2, 3, 4]
    assert metadata["num_sequences"] == 1
