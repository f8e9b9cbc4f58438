"""Training under context parallelism matches the single process (fp32, CPU, gloo).

The layout checker trains the tiny Llama-3 2 steps on packed multi-document sequences of 64
tokens (documents longer than a chunk, spanning chunk and rank borders) and the comparison
reassembles the full weights: loss, grad norm and updated weights must agree within 1e-5
relative for both algorithms, CP 2 and 4, TP2 x CP2 x PP2 and CP2 x DP2.
"""
import json

import pytest
import torch

from engine.parallel.context.chunks import rank_token_indices
from engine.tools.layout_check import DEFAULT_TOLERANCE, compare_runs, synthetic_global_batch
from engine.training.data import InMemorySequences, SampleSource, micro_batch_for_rank
from tests.distributed import torchrun

SEQ = ["--seq-length", "64"]
# CP2 runs mask every sequence's first 48 targets (an SFT prompt): rank 1 holds tokens 16..47
# only, so all of its tokens are masked, and it must neither produce NaN nor skew the average.
MASKED = ["--masked-prompt-tokens", "48", "--positions", "document"]
LAYOUTS = {
    # name: (processes, flags, reference)
    "cp2_all_gather_masked_rank": (2, ["--cp", "2", *MASKED], "masked"),
    "cp2_ulysses_masked_rank": (2, ["--cp", "2", "--cp-algorithm", "ulysses", *MASKED], "masked"),
    "cp4_all_gather": (4, ["--cp", "4"], "plain"),
    # 4 heads, 2 KV heads: Ulysses repeats KV heads to 4.
    "cp4_ulysses": (4, ["--cp", "4", "--cp-algorithm", "ulysses"], "plain"),
    "tp2_cp2_pp2_all_gather": (8, ["--tp", "2", "--sp", "--pp", "2", "--cp", "2",
                                   "--micro-batch", "2"], "plain"),
    # 2 heads and 1 KV head per TP rank: Ulysses over CP2 repeats the KV head.
    "tp2_cp2_pp2_ulysses": (8, ["--tp", "2", "--sp", "--pp", "2", "--cp", "2", "--micro-batch",
                                "2", "--cp-algorithm", "ulysses"], "plain"),
    "cp2_dp2_all_gather": (4, ["--cp", "2", "--distributed-optimizer"], "plain"),
    "cp2_dp2_ulysses": (4, ["--cp", "2", "--cp-algorithm", "ulysses",
                            "--distributed-optimizer"], "plain"),
}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    runs = {}
    for name, flags in (("plain", []), ("masked", MASKED)):
        out = tmp_path_factory.mktemp(f"reference_{name}")
        torchrun("engine.tools.layout_check", 1, [*SEQ, *flags, "--out", str(out)])
        runs[name] = out
    return runs


def test_synthetic_data_exercises_cp_borders():
    """The data the layout runs train on has what CP gets wrong: documents spanning chunk
    borders, documents longer than a chunk, and (masked runs) a rank without valid tokens."""
    tokens, doc_lengths, masks = synthetic_global_batch(512, 8, 64, 1234)
    for cp in (2, 4):
        chunk = 64 // (2 * cp)
        starts = [set(torch.tensor(d).cumsum(0).tolist()) for d in doc_lengths]
        spanning = sum(any(b % chunk for b in s) for s in starts)
        assert spanning >= 4, cp
        assert any(max(d) > chunk for d in doc_lengths)
    tokens, doc_lengths, masks = synthetic_global_batch(512, 8, 64, 1234,
                                                        masked_prompt_tokens=48)
    samples = SampleSource(InMemorySequences(tokens, doc_lengths, masks), 64)
    valid = 0
    for i in range(8):
        assert micro_batch_for_rank(samples, [i], 1, 2).loss_mask.sum() == 0
        valid += micro_batch_for_rank(samples, [i], 0, 2).loss_mask.sum()
    assert valid > 0
    assert len(rank_token_indices(64, 1, 2)) == 32


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_context_parallel_matches_single_process(name, references, tmp_path):
    nproc, flags, reference = LAYOUTS[name]
    torchrun("engine.tools.layout_check", nproc, [*SEQ, *flags, "--out", str(tmp_path)],
             timeout=300)
    errors = compare_runs(references[reference], tmp_path)
    print(name, json.dumps(errors))  # the numbers behind docs/testing.md (pytest -s)
    assert errors["num_tokens"] == 0
    for key in ("loss", "grad_norm", "weights"):
        assert errors[key] <= DEFAULT_TOLERANCE, (name, key, errors)
    steps = json.loads((tmp_path / "steps.json").read_text())["steps"]
    assert all(torch.isfinite(torch.tensor([s["loss"], s["grad_norm"]])).all() for s in steps)
    assert steps[1]["loss"] < steps[0]["loss"]
