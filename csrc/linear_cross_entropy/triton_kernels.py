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
        grad_W   += dlogits.T @ h_c        cuBLAS, accumulated in W's dtype

Peak memory is hidden + weight + their gradients + one [C, V_local] chunk, the floor the issue asks
for. Under tensor parallelism the row statistics are all-reduced between the statistics kernel and
the gradient kernel. grad_W accumulates across chunks in the weight's dtype (like Liger-Kernel):
for bf16 that adds one bf16 rounding per chunk, the price of not holding an fp32 [V, H] buffer.
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


class FusedLinearCrossEntropy(torch.autograd.Function):
    """autograd wrapper; inputs are validated by csrc.linear_cross_entropy.fused_linear_cross_entropy."""

    @staticmethod
    def forward(ctx, hidden, weight, target_col, counted, tp_group, chunk_size):
        want_hidden_grad, want_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden_grad else None
        grad_weight = torch.zeros_like(weight) if want_weight_grad else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for c0 in range(0, hidden.shape[0], chunk_size):
            c1 = min(c0 + chunk_size, hidden.shape[0])
            hidden_chunk = hidden[c0:c1]
            logits = hidden_chunk @ weight.t()
            loss_sum += _chunk_loss_and_grad(logits, target_col[c0:c1], counted[c0:c1], tp_group).sum()
            if want_hidden_grad:
                torch.mm(logits, weight, out=grad_hidden[c0:c1])
            if want_weight_grad:
                grad_weight.addmm_(logits.t(), hidden_chunk)
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight) if g is not None))
        ctx.has_grads = (want_hidden_grad, want_weight_grad)
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss):
        saved = iter(ctx.saved_tensors)
        grads = []
        for has_grad in ctx.has_grads:
            # Scaled in place: these buffers exist only to be returned once.
            grads.append(next(saved).mul_(grad_loss.to(torch.float32)) if has_grad else None)
        return grads[0], grads[1], None, None, None, None
