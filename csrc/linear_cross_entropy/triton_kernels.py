"""Fused output layer + cross-entropy that never holds more than one chunk of logits.

Spec: csrc/linear_cross_entropy/reference.py. Gradients are computed during the forward, chunk by
chunk (the loss is a scalar, so d loss_sum / d logits = softmax - onehot does not depend on the
upstream gradient, which backward applies as one scale):

    for each chunk of C tokens:
        logits = h_c @ W.T                 [C, V_local], cuBLAS, in the input dtype
        Triton, one program per row:      row max / sum-exp / target logit -> loss; then the
                                           logits buffer is overwritten in place with
                                           (softmax - onehot) for counted rows, 0 otherwise
        grad_h[c] = dlogits @ W            cuBLAS
        grad_W   += dlogits.T @ h_c        cuBLAS, accumulated in fp32

Peak memory is hidden + weight + their gradients + one [C, V_local] chunk, the floor the issue asks
for. Under tensor parallelism the row statistics are all-reduced between the statistics kernel and
the gradient kernel. grad_W accumulates across chunks in an fp32 [V_local, H] buffer, rounded to the
weight's dtype once in backward (a bf16 running sum would add one rounding per chunk); the buffer
lives from forward to backward, 2 bytes per weight element more than a bf16 one.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

# constexpr: compiled Triton may read module globals only when they are marked constexpr
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def _row_max_sum_exp(row_ptr, n_cols, BLOCK_V: tl.constexpr):
    """Online (max, sum exp(x - max)) of one row of logits, in fp32."""
    row_max = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_V], dtype=tl.float32)
    for v0 in range(0, n_cols, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(row_max, x)
        # Lanes that have only seen padding keep -inf; shift them by 0 to avoid -inf - -inf.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.math.exp2((row_max - shift) * LOG2E) + tl.math.exp2((x - shift) * LOG2E)
        row_max = new_max
    total_max = tl.max(row_max, 0)
    total_sum = tl.sum(row_sum * tl.math.exp2((row_max - total_max) * LOG2E), 0)
    return total_max, total_sum


@triton.jit
def _write_row_grad(row_ptr, n_cols, lse, target_col, counted, BLOCK_V: tl.constexpr):
    """Overwrite the row of logits with d loss / d logits = (softmax - onehot) if counted, else 0."""
    for v0 in range(0, n_cols, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        in_row = cols < n_cols
        x = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        grad = tl.math.exp2((x - lse) * LOG2E) - tl.where(cols == target_col, 1.0, 0.0)
        grad = tl.where(counted, grad, 0.0)
        tl.store(row_ptr + cols, grad.to(row_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _ce_fused_kernel(Logits, stride_row, TargetCol, Counted, Loss, n_cols, BLOCK_V: tl.constexpr):
    """Single rank: loss of the row, then its gradient written over the logits."""
    row = tl.program_id(0)
    row_ptr = Logits + row.to(tl.int64) * stride_row
    target_col = tl.load(TargetCol + row)
    counted = tl.load(Counted + row) != 0
    row_max, row_sum = _row_max_sum_exp(row_ptr, n_cols, BLOCK_V)
    lse = row_max + tl.math.log2(row_sum) * LN2
    target = tl.load(row_ptr + target_col, mask=counted, other=0.0).to(tl.float32)
    tl.store(Loss + row, tl.where(counted, lse - target, 0.0))
    _write_row_grad(row_ptr, n_cols, lse, target_col, counted, BLOCK_V)


@triton.jit
def _ce_stats_kernel(Logits, stride_row, TargetCol, Stats, n_rows, n_cols, BLOCK_V: tl.constexpr):
    """Tensor parallel, before the all-reduce: Stats = [row max, sum exp(x - row max), target logit]
    of this rank's vocabulary shard (target 0 where the label lives on another rank)."""
    row = tl.program_id(0)
    row_ptr = Logits + row.to(tl.int64) * stride_row
    target_col = tl.load(TargetCol + row)
    row_max, row_sum = _row_max_sum_exp(row_ptr, n_cols, BLOCK_V)
    target = tl.load(row_ptr + target_col, mask=target_col >= 0, other=0.0).to(tl.float32)
    tl.store(Stats + row, row_max)
    tl.store(Stats + n_rows + row, row_sum)
    tl.store(Stats + 2 * n_rows + row, target)


@triton.jit
def _ce_grad_kernel(Logits, stride_row, TargetCol, Counted, Lse, n_cols, BLOCK_V: tl.constexpr):
    """Tensor parallel, after the all-reduce: gradient from the group-wide log-sum-exp."""
    row = tl.program_id(0)
    row_ptr = Logits + row.to(tl.int64) * stride_row
    counted = tl.load(Counted + row) != 0
    _write_row_grad(row_ptr, n_cols, tl.load(Lse + row), tl.load(TargetCol + row), counted, BLOCK_V)


def _block_v(n_cols: int) -> int:
    return min(triton.next_power_of_2(n_cols), 4096)


def _chunk_loss_and_grad(logits, target_col, counted, tp_group) -> torch.Tensor:
    """Loss per row [C] fp32; logits [C, V_local] is overwritten with d loss_sum / d logits."""
    n_rows, n_cols = logits.shape
    block_v = _block_v(n_cols)
    counted_i8 = counted.to(torch.int8)
    if tp_group is None:
        loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
        _ce_fused_kernel[(n_rows,)](logits, logits.stride(0), target_col, counted_i8, loss, n_cols, BLOCK_V=block_v)
        return loss
    stats = torch.empty(3, n_rows, dtype=torch.float32, device=logits.device)
    _ce_stats_kernel[(n_rows,)](logits, logits.stride(0), target_col, stats, n_rows, n_cols, BLOCK_V=block_v)
    local_max, local_sum, target = stats
    global_max = local_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
    # Re-base each rank's sum to the global max, then one all-reduce carries sums and targets.
    sums_and_target = torch.stack([local_sum * torch.exp(local_max - global_max), target])
    dist.all_reduce(sums_and_target, op=dist.ReduceOp.SUM, group=tp_group)
    lse = global_max + torch.log(sums_and_target[0])
    _ce_grad_kernel[(n_rows,)](logits, logits.stride(0), target_col, counted_i8, lse, n_cols, BLOCK_V=block_v)
    return torch.where(counted, lse - sums_and_target[1], torch.zeros_like(lse))


def _add_weight_grad(grad_weight: torch.Tensor, dlogits: torch.Tensor, hidden_chunk: torch.Tensor) -> None:
    """grad_weight (fp32) += dlogits.T @ hidden_chunk, summed in fp32 across chunks.

    Adding each chunk's product to a bf16 buffer would round the running sum once per chunk (64
    roundings at 64K tokens, whose errors grow with the sum); cuBLAS writes the fp32 sum directly
    (out_dtype). Elsewhere (the CPU interpreter in tests) the product is formed in slabs of rows so
    that its temporary stays small.
    """
    if dlogits.dtype == grad_weight.dtype:
        grad_weight.addmm_(dlogits.t(), hidden_chunk)
    elif grad_weight.is_cuda:
        torch.addmm(grad_weight, dlogits.t(), hidden_chunk, out_dtype=torch.float32, out=grad_weight)
    else:
        slab = 4096
        for v0 in range(0, grad_weight.shape[0], slab):
            grad_weight[v0:v0 + slab] += (dlogits[:, v0:v0 + slab].t() @ hidden_chunk).float()


@torch.library.custom_op("csrc::linear_cross_entropy_forward", mutates_args=())
def linear_cross_entropy_forward(
    hidden: torch.Tensor, weight: torch.Tensor, target_col: torch.Tensor, counted: torch.Tensor,
    tp_group_name: str | None, chunk_size: int, hidden_grad: bool, weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_sum fp32 scalar, d loss_sum / d hidden or an empty tensor, d loss_sum / d weight in
    fp32 or an empty tensor). tp_group_name names the vocabulary-parallel group (None: one rank)."""
    tp_group = None if tp_group_name is None else dist.distributed_c10d._resolve_process_group(tp_group_name)
    grad_hidden = torch.empty_like(hidden) if hidden_grad else hidden.new_empty(0)
    grad_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if weight_grad
                   else weight.new_empty(0, dtype=torch.float32))
    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for c0 in range(0, hidden.shape[0], chunk_size):
        c1 = min(c0 + chunk_size, hidden.shape[0])
        hidden_chunk = hidden[c0:c1]
        logits = hidden_chunk @ weight.t()
        loss_sum += _chunk_loss_and_grad(logits, target_col[c0:c1], counted[c0:c1], tp_group).sum()
        if hidden_grad:
            torch.mm(logits, weight, out=grad_hidden[c0:c1])
        if weight_grad:
            _add_weight_grad(grad_weight, logits, hidden_chunk)
    return loss_sum, grad_hidden, grad_weight


@linear_cross_entropy_forward.register_fake
def _linear_cross_entropy_forward_fake(hidden, weight, target_col, counted, tp_group_name, chunk_size,
                                       hidden_grad, weight_grad):
    return (hidden.new_empty((), dtype=torch.float32),
            torch.empty_like(hidden) if hidden_grad else hidden.new_empty(0),
            weight.new_empty(weight.shape if weight_grad else (0,), dtype=torch.float32))


def _adds_to_main_grad(weight: torch.Tensor) -> bool:
    """Whether megatron's data-parallel wrapper keeps an fp32-or-wider main_grad for this weight
    that backward may add to directly (as its fused weight-gradient GEMMs do). Not for a weight
    shared with the embedding: its other gradient still arrives through .grad."""
    main_grad = getattr(weight, "main_grad", None)
    return (main_grad is not None and hasattr(weight, "grad_added_to_main_grad")
            and main_grad.shape == weight.shape and main_grad.dtype == torch.float32
            and not getattr(weight, "shared_embedding", False) and not getattr(weight, "shared", False))


def _linear_cross_entropy_setup_context(ctx, inputs, output):
    _, weight, *_ = inputs
    _, grad_hidden, grad_weight = output
    ctx.save_for_backward(grad_hidden, grad_weight)
    ctx.weight_dtype = weight.dtype
    ctx.weight = weight if _adds_to_main_grad(weight) else None
    # The gradient buffers are outputs only to carry them to backward: no gradient flows into
    # them, and none should be materialized as zeros of their size.
    ctx.mark_non_differentiable(grad_hidden, grad_weight)
    ctx.set_materialize_grads(False)


def _linear_cross_entropy_backward(ctx, grad_loss, _grad_of_grad_hidden, _grad_of_grad_weight):
    grad_hidden, grad_weight = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * 8
    scale = grad_loss.to(torch.float32)
    # grad_hidden is scaled in place: the buffer exists only to be returned once. grad_weight
    # is rounded to the weight's dtype once, after the fp32 sum over every chunk.
    d_hidden = grad_hidden.mul_(scale) if ctx.needs_input_grad[0] else None
    d_weight = None
    if ctx.needs_input_grad[1] and ctx.weight is not None:
        # Straight into megatron's fp32 main_grad: no rounding to the weight's dtype at all.
        # Like megatron's own fused GEMMs, flag it and hand autograd a placeholder, which the
        # wrapper's gradient hook then drops instead of adding.
        weight = ctx.weight
        weight.main_grad.addcmul_(grad_weight, scale)
        weight.grad_added_to_main_grad = True
        d_weight = torch.empty(weight.shape, dtype=ctx.weight_dtype, device=weight.device)
    elif ctx.needs_input_grad[1]:
        d_weight = (grad_weight * scale).to(ctx.weight_dtype)
    return d_hidden, d_weight, None, None, None, None, None, None


linear_cross_entropy_forward.register_autograd(_linear_cross_entropy_backward,
                                               setup_context=_linear_cross_entropy_setup_context)


def fused_linear_cross_entropy_loss(hidden, weight, target_col, counted, tp_group, chunk_size) -> torch.Tensor:
    """loss_sum of validated inputs (csrc.linear_cross_entropy.fused_linear_cross_entropy), its
    gradients formed during the forward for the inputs that require one."""
    grad_enabled = torch.is_grad_enabled()
    loss_sum, _, _ = linear_cross_entropy_forward(
        hidden, weight, target_col, counted, None if tp_group is None else tp_group.group_name, int(chunk_size),
        grad_enabled and hidden.requires_grad, grad_enabled and weight.requires_grad)
    return loss_sum
