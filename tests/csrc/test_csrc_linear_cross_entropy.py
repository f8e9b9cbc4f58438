"""fused_linear_cross_entropy: reference vs fp64 oracle, Triton vs reference, TP=2 over gloo.

Tolerances (TOL below): fp32 loss 1e-5 relative, gradients 1e-5 abs; bf16 against the fp64 oracle
2e-2 relative on the loss and 3e-2 abs + 2e-2 relative on gradients (bf16 logits and bf16 logit
gradients, as in the unfused bf16 path; grad_W is summed over chunks in fp32).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import assert_close, init_gloo, run_ranks

from csrc.linear_cross_entropy import default_chunk_size, fused_linear_cross_entropy

TOKENS, HIDDEN, VOCAB = 45, 32, 70
TOL = {
    torch.float32: dict(loss_rtol=1e-5, grad_atol=1e-5, grad_rtol=0),
    torch.bfloat16: dict(loss_rtol=2e-2, grad_atol=3e-2, grad_rtol=2e-2),
}


def make_inputs(dtype, seed=0, tokens=TOKENS, vocab=VOCAB):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, HIDDEN, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, HIDDEN, generator=gen, dtype=torch.float64) / math.sqrt(HIDDEN) * 3
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    labels[[0, 7, 12]] = -100
    loss_mask = torch.ones(tokens)
    loss_mask[10:20] = 0  # includes a -100 label under a 0 mask and a whole masked run
    return hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_(), labels, loss_mask


def oracle(hidden, weight, labels, loss_mask):
    """Dense fp64 logits + F.cross_entropy, then the gradients of loss_sum."""
    h, w = (t.detach().double().requires_grad_() for t in (hidden, weight))
    keep = (labels != -100) & (loss_mask != 0)
    losses = F.cross_entropy(h @ w.t(), labels.clamp(min=0), reduction="none")
    loss_sum = (losses * keep).sum()
    return (loss_sum, keep.sum(), *torch.autograd.grad(loss_sum, (h, w)))


def run(impl, hidden, weight, labels, loss_mask, chunk_size=16, grad_scale=1.0):
    loss_sum, n_valid = fused_linear_cross_entropy(hidden, weight, labels, loss_mask, chunk_size=chunk_size, impl=impl)
    assert loss_sum.dtype == torch.float32 and n_valid.dtype == torch.int64
    grads = torch.autograd.grad(loss_sum * grad_scale, (hidden, weight))
    return (loss_sum, n_valid, *(g / grad_scale for g in grads))


@pytest.mark.parametrize("impl", ["torch", "ours"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_fp64_oracle(impl, dtype):
    hidden, weight, labels, loss_mask = make_inputs(dtype)
    expected = oracle(hidden, weight, labels, loss_mask)
    got = run(impl, hidden, weight, labels, loss_mask, grad_scale=0.5)  # a non-unit upstream gradient
    assert got[1].item() == expected[1].item() == TOKENS - 2 - 10  # 3 ignored labels, 10 masked, label 12 is both
    tol = TOL[dtype]
    assert_close(got[0], expected[0], 0, tol["loss_rtol"], f"{impl} {dtype} loss_sum")
    assert_close(got[2], expected[2], tol["grad_atol"], tol["grad_rtol"], f"{impl} {dtype} grad hidden")
    assert_close(got[3], expected[3], tol["grad_atol"], tol["grad_rtol"], f"{impl} {dtype} grad weight")


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_triton_matches_reference_for_any_chunking(chunk_size):
    hidden, weight, labels, loss_mask = make_inputs(torch.float32, seed=3, vocab=5000)  # several vocab blocks
    expected = run("torch", hidden, weight, labels, None, chunk_size=1000)
    got = run("ours", hidden, weight, labels, None, chunk_size=chunk_size)
    for name, a, b in zip(("loss_sum", "n_valid", "grad hidden", "grad weight"), got, expected):
        assert_close(a, b, 1e-5, 1e-5, name)


def test_all_tokens_masked_gives_zero_loss_and_gradients():
    hidden, weight, labels, _ = make_inputs(torch.float32)
    for impl in ("torch", "ours"):
        loss_sum, n_valid, grad_h, grad_w = run(impl, hidden, weight, labels, torch.zeros(TOKENS))
        assert loss_sum.item() == 0 and n_valid.item() == 0
        assert torch.all(grad_h == 0) and torch.all(grad_w == 0)


def test_check_can_fail():
    """A wrong label shifts the loss beyond tolerance: the comparison is not vacuous."""
    hidden, weight, labels, loss_mask = make_inputs(torch.float32)
    expected = oracle(hidden, weight, labels, loss_mask)
    shifted = labels.clone()
    shifted[3] = (shifted[3] + 1) % VOCAB
    got = run("ours", hidden, weight, shifted, loss_mask)
    with pytest.raises(AssertionError):
        assert_close(got[0], expected[0], 0, 1e-5, "loss")


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(label=VOCAB), f"label {VOCAB} is outside the vocabulary"),
        (dict(label=-5), "label -5 is outside the vocabulary"),
        (dict(labels_dtype=torch.int32), "labels must be int64"),
        (dict(mask_len=3), "must have the labels' shape"),
        (dict(weight_cols=HIDDEN + 1), "must be \\[T, H\\] and \\[V_local, H\\]"),
    ],
)
def test_bad_input_is_rejected(change, message):
    hidden, weight, labels, loss_mask = make_inputs(torch.float32)
    if "label" in change:
        labels[1] = change["label"]
    labels = labels.to(change.get("labels_dtype", torch.int64))
    if "mask_len" in change:
        loss_mask = loss_mask[: change["mask_len"]]
    if "weight_cols" in change:
        weight = torch.zeros(VOCAB, change["weight_cols"])
    with pytest.raises(ValueError, match=message):
        fused_linear_cross_entropy(hidden, weight, labels, loss_mask, impl="ours")


def test_default_chunk_size_keeps_logits_chunk_at_half_the_hidden_states():
    # Llama-3 8B at 64K tokens: 1024 tokens x 128,256 vocab is ~0.5x the 64K x 4096 hidden states.
    assert default_chunk_size(65536, 4096, 128256) == 1024
    assert default_chunk_size(100, 64, 1000) == 256


def _tensor_parallel_worker(rank, world_size, port, dtype):
    group = init_gloo(rank, world_size, port)
    hidden, weight, labels, loss_mask = make_inputs(dtype, seed=5)
    expected = oracle(hidden, weight, labels, loss_mask)
    shard = VOCAB // world_size
    weight_shard = weight.detach()[rank * shard : (rank + 1) * shard].clone().requires_grad_()
    for impl in ("torch", "ours"):
        loss_sum, n_valid = fused_linear_cross_entropy(hidden, weight_shard, labels, loss_mask, tp_group=group,
                                                       chunk_size=16, impl=impl)
        grad_h, grad_w = torch.autograd.grad(loss_sum, (hidden, weight_shard))
        grad_h = grad_h.clone()
        torch.distributed.all_reduce(grad_h, group=group)  # what the caller's TP region does
        tol = TOL[dtype]
        assert n_valid.item() == expected[1].item()
        assert_close(loss_sum, expected[0], 0, tol["loss_rtol"], f"rank {rank} {impl} loss_sum")
        assert_close(grad_h, expected[2], tol["grad_atol"], tol["grad_rtol"], f"rank {rank} {impl} grad hidden (all-reduced)")
        assert_close(grad_w, expected[3][rank * shard : (rank + 1) * shard], tol["grad_atol"], tol["grad_rtol"],
                     f"rank {rank} {impl} grad weight")
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensor_parallel_vocab_shards_match_single_rank(dtype):
    run_ranks(_tensor_parallel_worker, 2, dtype)


def test_token_scores_are_per_token_cross_entropy_and_the_first_argmax():
    from csrc.linear_cross_entropy import linear_token_scores

    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(37, 16, generator=gen, dtype=torch.float64)
    weight = torch.randn(50, 16, generator=gen, dtype=torch.float64)
    weight[7] = weight[3]  # a tie: rows 3 and 7 always score the same
    labels = torch.randint(0, 45, (37,), generator=gen)
    # The last 5 rows are tensor-parallel padding: never predicted, not in the softmax.
    logits = (hidden @ weight[:45].t())
    loss, best = linear_token_scores(hidden, weight, labels, vocab_size=45, chunk_size=8)
    expected = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(best, logits.argmax(dim=1))
    hidden[0] = weight[3] * 10  # row 0 now prefers ids 3 and 7 equally: the lowest wins
    _, best = linear_token_scores(hidden, weight, labels, vocab_size=45)
    assert int(best[0]) == 3


def test_weight_gradient_is_summed_in_fp32_over_many_chunks():
    """bf16 inputs, 128 chunks: the output layer's weight gradient carries about one bf16 rounding
    (the oracle's own rounding to bf16 is the floor), not one per chunk. Measured: 6.1e-3 of the
    largest entry against a floor of 3.3e-3; a bf16 running sum gives 1.9e-2."""
    hidden, weight, labels, loss_mask = make_inputs(torch.bfloat16, seed=2, tokens=512)
    expected = oracle(hidden, weight, labels, loss_mask)[3]
    got = run("ours", hidden, weight, labels, loss_mask, chunk_size=4)[3]
    assert got.dtype == torch.bfloat16
    scale = expected.abs().max()
    error = ((got.double() - expected).abs().max() / scale).item()
    floor = ((expected.to(torch.bfloat16).double() - expected).abs().max() / scale).item()
    assert error <= min(2.5 * floor, 1e-2), f"grad weight error {error:.2e} (one bf16 rounding: {floor:.2e})"


def test_weight_gradient_goes_straight_into_megatron_main_grad():
    """A weight whose data-parallel wrapper keeps an fp32 main_grad (megatron's DDP) gets the fp32
    sum added there, scaled by the upstream gradient and never rounded to bf16; the flag tells
    megatron's hook to drop the placeholder .grad. Two micro-batches accumulate."""
    hidden, weight, labels, loss_mask = make_inputs(torch.bfloat16, seed=4)
    rounded = run("ours", hidden, weight, labels, loss_mask, chunk_size=8)[3]  # the plain path: bf16 .grad
    weight.main_grad = torch.zeros(weight.shape, dtype=torch.float32)
    weight.grad_added_to_main_grad = False
    for _ in range(2):
        loss_sum, _ = fused_linear_cross_entropy(hidden, weight, labels, loss_mask, chunk_size=8, impl="ours")
        (0.5 * loss_sum).backward()
    assert weight.grad_added_to_main_grad
    # 0.5 g + 0.5 g = g exactly: main_grad holds the fp32 sum whose bf16 rounding the plain path returns
    assert torch.equal(weight.main_grad.to(torch.bfloat16), rounded)
    assert not torch.equal(weight.main_grad, rounded.float()), "main_grad was rounded to bf16"
