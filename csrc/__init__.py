"""Fused kernels for long-context training, each beside the plain-PyTorch reference that specifies it.

    csrc.attention             varlen_attention, merge_attention_outputs
    csrc.linear_cross_entropy  fused_linear_cross_entropy
    csrc.rmsnorm               rms_norm
    csrc.rope                  apply_rope, apply_rope_cos_sin, rope_cos_sin
    csrc.swiglu                swiglu
    csrc.select                select_attention_backend, varlen_attention_function

Importing csrc does not import triton: Triton kernel modules load on first use, on CUDA tensors
(or CPU tensors with TRITON_INTERPRET=1).
"""
