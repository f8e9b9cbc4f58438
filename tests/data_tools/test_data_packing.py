"""The three packing rules on hand-checked lengths."""
import numpy as np
import pytest

from data_tools.packing import pack_concatenated, pack_whole, split_long


def test_concatenated_overflow_continues_in_the_next_sequence():
    packed = pack_concatenated(np.array([3, 5, 2, 7, 1]), seq_length=4)  # 18 tokens
    assert packed.sequences.tolist() == [[0, 4, 0], [4, 8, 1], [8, 12, 2], [12, 16, 3]]
    assert packed.starts.tolist() == [0, 3, 8, 10, 17, 18]
    assert packed.dropped_tokens == 2 and packed.dropped_documents == 1  # the last "1"


def test_split_long_cuts_pieces_and_drops_short_documents_and_tails():
    packed = split_long(np.array([9, 3, 8, 4]), seq_length=4)
    assert packed.kept.tolist() == [0, 2, 3]
    assert packed.starts.tolist() == [0, 9, 17, 21]
    assert packed.sequences.tolist() == [[0, 4, 0], [4, 8, 0], [9, 13, 1], [13, 17, 1],
                                         [17, 21, 2]]
    assert packed.dropped_documents == 1 and packed.dropped_tokens == 3 + 1


def test_pack_whole_moves_or_drops_overflow_and_drops_too_long():
    lengths = np.array([3, 2, 4, 9, 1, 5])
    moved = pack_whole(lengths, seq_length=6, overflow="move")
    assert moved.kept.tolist() == [0, 1, 2, 4, 5]
    assert moved.sequences.tolist() == [[0, 5, 0], [5, 10, 2], [10, 15, 4]]
    assert (moved.dropped_documents, moved.dropped_tokens) == (1, 9)
    dropped = pack_whole(lengths, seq_length=6, overflow="drop")
    # 3+2 open; 4 overflows: dropped, sequence closed; 9 too long; 1 opens; 5 fits exactly.
    assert dropped.kept.tolist() == [0, 1, 4, 5]
    assert dropped.sequences.tolist() == [[0, 5, 0], [5, 11, 2]]
    assert (dropped.dropped_documents, dropped.dropped_tokens) == (2, 13)
    with pytest.raises(ValueError, match="overflow"):
        pack_whole(lengths, 6, overflow="truncate")
