"""Context parallelism: the sequence of every micro-batch split over the CP group.

- chunks.py: the causal load balance (rank r holds chunks r and 2CP-1-r of 2 x CP) and the
  checks a CP configuration must pass before any process group exists.
- data.py: each rank's tokens, labels, loss mask and RoPE positions (from the global token
  index), from a built micro-batch or straight from a PackedDataset's token windows.
- comm.py: all_gather_sequence (all-gather forward, reduce-scatter backward) and
  ulysses_all_to_all, as autograd functions.
- all_gather.py: all-gather K/V attention (Llama 3); ulysses.py: all-to-all attention (ProLong).
- module.py: ContextParallelAttention, megatron-core's core_attention for CP > 1, and the spec
  that chooses an algorithm (transformer-engine's where it is installed).

The loss needs nothing CP-specific: each rank returns its tokens' loss sum and valid-token count;
megatron (calculate_per_token_loss) all-reduces the count and DDP sums gradients over the
data x context parallel group, so the global token average is exact and a rank whose tokens
are all masked contributes zeros, not 0 / 0.
"""
from engine.parallel.context.chunks import (
    CP_ALGORITHMS,
    chunk_length,
    load_balanced_chunks,
    rank_token_indices,
    validate_context_parallel,
)

__all__ = ["CP_ALGORITHMS", "chunk_length", "load_balanced_chunks", "rank_token_indices",
           "validate_context_parallel"]
