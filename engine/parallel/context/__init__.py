"""Context parallelism: the sequence of every micro-batch split over the CP group.

- chunks.py: the causal load balance (rank r holds chunks r and 2CP-1-r of 2 x CP) and the
  permutations between a rank's local order and sequence order.
- comm.py: all_gather_sequence (all-gather forward, reduce-scatter backward) and
  ulysses_all_to_all, as autograd functions.
- all_gather.py: all-gather K/V attention (Llama 3); ulysses.py: all-to-all attention (ProLong).
- module.py: ContextParallelAttention, megatron-core's core_attention slot for CP > 1.

Which tokens a rank reads (and their labels, loss mask and RoPE positions from the global token
index) is the training data path's business: engine.training.data. The checks a CP layout must
pass live with every other layout check in engine.parallel.layout.

The loss needs nothing CP-specific: each rank returns its tokens' loss sum and valid-token count;
megatron (calculate_per_token_loss) all-reduces the count and DDP sums gradients over the
data x context parallel group, so the global token average is exact and a rank whose tokens
are all masked contributes zeros, not 0 / 0.
"""
