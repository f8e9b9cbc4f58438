"""Packed sequences -> micro-batches: targets, loss masks, positions, boundaries, balancing."""
import numpy as np
import pytest
import torch

from engine.training.data import (
    attention_cost,
    balance_global_batch,
    build_micro_batch,
    document_positions,
    targets_and_mask,
)


def test_targets_are_next_tokens_and_cross_document_targets_are_masked():
    tokens = np.arange(10, 20)
    labels, mask = targets_and_mask(tokens, np.array([3, 5, 2]), None, mask_cross_document=True)
    assert labels[:-1].tolist() == list(range(11, 20))
    # Positions 2 and 7 end documents; 9 is the last position (no next token in the sequence).
    assert np.flatnonzero(mask == 0).tolist() == [2, 7, 9]
    _, mask = targets_and_mask(tokens, np.array([3, 5, 2]), None, mask_cross_document=False)
    assert np.flatnonzero(mask == 0).tolist() == [9]


def test_sft_token_mask_selects_predicted_tokens():
    tokens = np.arange(6)
    token_mask = np.array([0, 0, 1, 1, 0, 1], dtype=np.float32)  # assistant tokens 2, 3, 5
    _, mask = targets_and_mask(tokens, np.array([6]), token_mask, mask_cross_document=True)
    # Position i predicts token i + 1: counted exactly when token i + 1 is an assistant token.
    assert mask.tolist() == [0, 1, 1, 0, 1, 0]


def test_positions_continuous_or_per_document_and_cu_seqlens():
    assert document_positions(np.array([3, 1, 4])).tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    tokens = [np.arange(8), np.arange(8, 16)]
    docs = [np.array([3, 1, 4]), np.array([8])]
    batch = build_micro_batch(tokens, docs, position_mode="document")
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 0, 1, 2, 3], list(range(8))]
    assert batch.cu_seqlens.tolist() == [0, 3, 4, 8, 16] and batch.max_seqlen == 8
    assert batch.cu_seqlens.dtype == torch.int32
    continuous = build_micro_batch(tokens, docs)
    assert continuous.position_ids.tolist() == [list(range(8))] * 2


def test_malformed_sequences_are_refused():
    with pytest.raises(ValueError, match="documents summing to 7"):
        build_micro_batch([np.arange(8)], [np.array([3, 4])])
    with pytest.raises(ValueError, match="position_mode 'reset'"):
        build_micro_batch([np.arange(8)], [np.array([8])], position_mode="reset")


def test_balancing_fills_every_slot_and_evens_attention_cost():
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 4000, rng.integers(1, 6)) for _ in range(32)]
    costs = [attention_cost(d) for d in docs]
    slots = balance_global_batch(costs, data_parallel=4, num_microbatches=4, micro_batch=2)
    assigned = sorted(i for rank in slots for micro in rank for i in micro)
    assert assigned == list(range(32))
    assert all(len(micro) == 2 for rank in slots for micro in rank)
    balanced = max(sum(costs[i] for micro in rank for i in micro) for rank in slots)
    contiguous = max(sum(costs[r * 8:(r + 1) * 8]) for r in range(4))
    ideal = sum(costs) / 4
    assert balanced <= contiguous and balanced < 1.1 * ideal
    assert slots == balance_global_batch(costs, 4, 4, 2)  # deterministic
