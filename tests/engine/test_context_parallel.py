"""Context parallelism pieces: load balance, positions, data slicing, validation, attention.

The attention check runs the user-facing self-check (engine.tools.cp_attention_check) under
torchrun: both algorithms, CP 2 and 4, against single-process attention in fp64, including a
deliberately wrong token-to-rank mapping that must fail. End-to-end training under CP is in
test_context_parallel_layouts.py.
"""
import json

import numpy as np
import pytest
import torch

from data_tools.indexed import IndexedWriter
from data_tools.packed_dataset import PackedDataset, write_packed
from data_tools.packing import pack_concatenated
from engine.model.config import get_model_config
from engine.parallel.context.chunks import (
    gathered_to_sequence_order,
    load_balanced_chunks,
    rank_token_indices,
    sequence_to_gathered_order,
)
from engine.parallel.context.ulysses import repeated_kv_heads
from engine.parallel.layout import LayoutError, ParallelLayout
from engine.training.data import (
    InMemorySequences,
    SampleSource,
    build_micro_batch,
    document_positions,
    micro_batch_for_rank,
    positions_of_tokens,
)
from tests.distributed import torchrun


def test_load_balance_pairs_early_and_late_chunks():
    assert [load_balanced_chunks(r, 4) for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    # Every token on exactly one rank; causal work (sum of token indices + 1) equal per rank.
    owned = np.concatenate([rank_token_indices(64, r, 4) for r in range(4)])
    assert sorted(owned.tolist()) == list(range(64))
    work = [int((rank_token_indices(64, r, 4) + 1).sum()) for r in range(4)]
    assert len(set(work)) == 1
    assert rank_token_indices(16, 1, 2).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    gathered = torch.from_numpy(owned)
    assert torch.equal(gathered[gathered_to_sequence_order(64, 4)], torch.arange(64))
    assert torch.equal(sequence_to_gathered_order(64, 4), gathered)


@pytest.mark.parametrize("mode", ["continuous", "document"])
def test_positions_under_cp_match_the_full_sequence(mode):
    """Later documents and documents spanning ranks get their single-process positions."""
    doc_lengths = np.array([3, 21, 1, 30, 9])  # 64 tokens: spans chunk (8) and rank borders
    full = np.arange(64) if mode == "continuous" else document_positions(doc_lengths)
    for cp in (2, 4):
        for rank in range(cp):
            index = rank_token_indices(64, rank, cp)
            np.testing.assert_array_equal(positions_of_tokens(index, doc_lengths, mode),
                                          full[index])


def _attention_at_positions(q, k, v, positions, doc_lengths):
    """What the model's attention computes for one packed sample whose tokens carry RoPE
    ``positions`` (int64 [S]): q/k/v [S, 1, heads, d] rotated by the model's RoPE, then
    document-masked causal attention (fp64 reference). Returns [S, heads, d]."""
    from csrc.attention import reference_varlen_attention
    from engine.model.attention import rotate_by_angles
    from engine.model.gpt import PerTokenRotaryEmbedding

    rope = PerTokenRotaryEmbedding(q.shape[-1], base=500_000.0)
    rope.positions = torch.as_tensor(positions)[None]
    angles = rope().double()
    q, k = (rotate_by_angles(x, angles, "torch")[:, 0] for x in (q, k))
    cu_seqlens = torch.from_numpy(np.concatenate([[0], np.cumsum(doc_lengths)]).astype(np.int32))
    out, _ = reference_varlen_attention(q, k, v[:, 0], cu_seqlens, cu_seqlens)
    return out


@pytest.mark.parametrize("mode", ["continuous", "document"])
def test_wrong_position_mapping_is_caught(mode):
    """Positions the CP ranks feed the model (micro_batch_for_rank, the training data path)
    give the single process's attention output; the bug users hit, a rank numbering its own
    tokens from 0 (or as one contiguous shard), gives another output, which this check sees.

    Under all-gather CP each rank rotates its Q and K at its positions and attends over the
    gathered keys: the same as rotating the full sequence at the positions the ranks hold.
    """
    doc_lengths = np.array([3, 21, 1, 30, 9])  # spans chunk (8) and rank (16) borders
    tokens = np.random.default_rng(0).integers(0, 500, 64)
    samples = SampleSource(InMemorySequences([tokens], [doc_lengths]), 64)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(64, 1, 4, 16, generator=generator, dtype=torch.float64)
               for _ in range(3))
    single = micro_batch_for_rank(samples, [0], position_mode=mode).position_ids[0]
    expected = _attention_at_positions(q, k, v, single, doc_lengths)

    cp = 4
    mappings = {"engine": np.zeros(64, np.int64), "local from 0": np.zeros(64, np.int64),
                "contiguous shard": np.zeros(64, np.int64)}
    for rank in range(cp):
        index = rank_token_indices(64, rank, cp)
        part = micro_batch_for_rank(samples, [0], rank, cp, position_mode=mode)
        mappings["engine"][index] = part.position_ids[0].numpy()
        local = np.arange(len(index))
        mappings["local from 0"][index] = positions_of_tokens(local, doc_lengths, mode)
        shard = np.arange(rank * 16, (rank + 1) * 16)
        mappings["contiguous shard"][index] = positions_of_tokens(shard, doc_lengths, mode)
    errors = {name: ((_attention_at_positions(q, k, v, positions, doc_lengths) - expected).norm()
                     / expected.norm()).item() for name, positions in mappings.items()}
    assert errors["engine"] == 0.0, errors
    assert errors["local from 0"] > 1e-2 and errors["contiguous shard"] > 1e-2, errors


def _sequences():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 500, size=(2, 64))
    lengths = [np.array([3, 21, 1, 30, 9]), np.array([64])]
    masks = [np.ones(64, np.float32), np.r_[np.zeros(40), np.ones(24)].astype(np.float32)]
    return tokens, lengths, masks


def test_rank_share_keeps_global_labels_positions_and_documents():
    tokens, lengths, masks = _sequences()
    full = build_micro_batch(list(tokens), lengths, masks, position_mode="document")
    samples = SampleSource(InMemorySequences(list(tokens), lengths, masks), 64)
    for rank in range(4):
        part = micro_batch_for_rank(samples, [0, 1], rank, 4, position_mode="document")
        index = torch.from_numpy(rank_token_indices(64, rank, 4))
        assert part.tokens.shape == (2, 16)
        for name in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(getattr(part, name), getattr(full, name)[:, index]), name
        assert torch.equal(part.cu_seqlens, full.cu_seqlens)


def _packed_dataset(folder, seq_length=64, with_mask=True):
    """A real PackedDataset (data_tools format) of short and long documents."""
    rng = np.random.default_rng(1)
    lengths = np.array([5, 70, 1, 9, 17, 40, 3, 33, 80, 2, 12], dtype=np.int64)
    tokens = rng.integers(1, 500, size=int(lengths.sum())).astype(np.int32)
    prefix = str(folder / "docs")
    writer = IndexedWriter(prefix, np.int32)
    writer.add_documents(tokens, lengths)
    writer.finalize()
    info = {"name": "docs", "prefix": prefix}
    if with_mask:
        mask_writer = IndexedWriter(prefix + "_mask", np.uint8)
        mask_writer.add_documents((rng.random(len(tokens)) > 0.3).astype(np.uint8), lengths)
        mask_writer.finalize()
        info["mask_prefix"] = prefix + "_mask"
    packed = pack_concatenated(lengths, seq_length)
    order = np.array([[0, s] for s in range(len(packed.sequences))])
    write_packed(str(folder / "packed"), {"seq_length": seq_length}, 
                 [(info, np.arange(len(lengths)), packed)], order)
    return PackedDataset(str(folder / "packed"))


@pytest.mark.parametrize("mode", ["continuous", "document"])
def test_packed_dataset_windows_match_the_full_micro_batch(tmp_path, mode):
    """Each rank reads only its windows (+1 token for the last label) and gets exactly its
    slice of the micro-batch the single process builds from whole sequences."""
    ds = _packed_dataset(tmp_path)
    indices = list(range(len(ds)))
    assert len(indices) >= 3
    whole = [ds[i] for i in indices]
    for i, seq in zip(indices, whole):
        np.testing.assert_array_equal(ds.document_lengths(i), seq.doc_lengths)
    full = build_micro_batch([s.tokens for s in whole], [s.doc_lengths for s in whole],
                             [s.loss_mask.astype(np.float32) for s in whole], position_mode=mode)
    reads = []
    original_get = ds.get
    ds.get = lambda i, start=0, end=None: reads.append((start, end)) or original_get(i, start, end)
    samples = SampleSource(ds, 64)
    for cp in (2, 4):
        for rank in range(cp):
            reads.clear()
            part = micro_batch_for_rank(samples, indices, rank, cp, position_mode=mode)
            index = torch.from_numpy(rank_token_indices(64, rank, cp))
            for name in ("tokens", "labels", "loss_mask", "position_ids"):
                expected = getattr(full, name)[:, index]
                assert torch.equal(getattr(part, name).to(expected.dtype), expected), (cp, rank, name)
            assert torch.equal(part.cu_seqlens, full.cu_seqlens)
            assert part.max_seqlen == full.max_seqlen
            # Only this rank's chunks (one extra token where the sequence goes on).
            chunk = 64 // (2 * cp)
            assert sum(end - start for start, end in reads) <= len(indices) * 2 * (chunk + 1)


def test_bad_context_parallel_input_names_values_and_fix():
    tiny = get_model_config("tiny")  # 4 heads, 2 KV heads
    with pytest.raises(LayoutError, match=r"seq_length 100 is not divisible by 2 x "
                                          r"context_parallel_size = 8.*104"):
        ParallelLayout(context_parallel=4).validate(tiny, seq_length=100)
    with pytest.raises(LayoutError, match=r"4 query heads.*not divisible by "
                                          r"context_parallel_size 8.*\[1, 2, 4\].*all-gather"):
        ParallelLayout(context_parallel=8, cp_algorithm="ulysses").validate(tiny)
    with pytest.raises(LayoutError, match=r"2 query heads per tensor-parallel rank.*"
                                          r"tensor_parallel 2.*context_parallel_size 4"):
        ParallelLayout(tensor_parallel=2, context_parallel=4,
                       cp_algorithm="ulysses").validate(tiny)
    for algorithm in ("ring", "transformer-engine"):  # TE's CP would attend across documents
        with pytest.raises(LayoutError, match=f"cp_algorithm '{algorithm}' is not one of"):
            ParallelLayout(context_parallel=2, cp_algorithm=algorithm).validate(tiny)
    # All-gather has no head constraint; Ulysses with CP above the 2 KV heads repeats them.
    ParallelLayout(context_parallel=8).validate(tiny, seq_length=64)
    ParallelLayout(context_parallel=4, cp_algorithm="ulysses").validate(tiny, seq_length=64)
    assert repeated_kv_heads(2, 4, 4) == 4 and repeated_kv_heads(8, 32, 8) == 8
    assert repeated_kv_heads(8, 32, 16) == 16  # Llama-3-8B at CP16: 8 KV heads -> 16
    ParallelLayout().validate(tiny, seq_length=7)  # no split without CP


def test_run_plan_refuses_transformer_engine_attention_under_cp():
    """The plan's own rule, not this CPU's lack of transformer-engine: TE attention resolved
    for a GPU (as RunPlan.create would there) has no context-parallel path here."""
    from engine.model.kernel_choices import KernelChoices
    from engine.training.config import ConfigError
    from engine.training.run_plan import RunPlan

    tiny = get_model_config("tiny")
    te = KernelChoices(attention="transformer-engine", rmsnorm="torch", rope="torch",
                       swiglu="torch", cross_entropy="torch")
    with pytest.raises(ConfigError, match="kernels.attention 'transformer-engine' has no "
                                          "context-parallel path"):
        RunPlan(model=tiny, layout=ParallelLayout(context_parallel=2), kernels=te,
                seq_length=64, global_batch=2)
    RunPlan(model=tiny, layout=ParallelLayout(), kernels=te, seq_length=64, global_batch=2)


def test_layout_checker_rejects_bad_cp_before_any_process_group(tmp_path):
    result = torchrun("engine.tools.layout_check", 2,
                      ["--cp", "2", "--seq-length", "30", "--out", str(tmp_path)],
                      timeout=120, check=False)
    assert result.returncode != 0
    assert "seq_length 30 is not divisible by 2 x context_parallel_size = 4" in result.stdout
    assert "init_process_group" not in result.stdout and not (tmp_path / "steps.json").exists()


def test_attention_matches_single_process_and_wrong_mapping_fails(tmp_path):
    out = tmp_path / "selfcheck.json"
    torchrun("engine.tools.cp_attention_check", 4, ["--out", str(out)], timeout=240)
    results = json.loads(out.read_text())
    assert all(r["passed"] and r["finite"] for r in results)
    right = [r for r in results if not r["wrong_mapping"]]
    wrong = [r for r in results if r["wrong_mapping"]]
    assert {(r["cp"], r["algorithm"]) for r in right} == {
        (2, "all-gather"), (2, "ulysses"), (4, "all-gather"), (4, "ulysses")}
    assert max(max(r["out"], r["dq"], r["dk"], r["dv"]) for r in right) < 1e-10
    assert min(max(r["out"], r["dq"], r["dk"], r["dv"]) for r in wrong) > 1e-2
