"""Parallel layouts and their pieces: the layout and its checks, process-group setup, and
one folder per parallel dimension megatron-core does not provide (context/)."""
