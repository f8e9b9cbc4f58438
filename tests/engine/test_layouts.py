"""Every parallel layout trains exactly like the single process (fp32, CPU, gloo), and bf16
like fp32 within bf16's precision.

Runs the user-facing layout checker under torchrun and compares loss, grad norm and the full
reassembled weights after 2 optimizer steps against the single-process run.
"""
import json

import pytest
import torch

from engine.tools.layout_check import (
    DEFAULT_TOLERANCE,
    compare_runs,
    load_full_weights,
    relative_error,
)
from tests.distributed import torchrun

LAYOUTS = {
    # name: (processes, flags)
    "tp2_sp": (2, ["--tp", "2", "--sp"]),
    "tp2_document_positions": (2, ["--tp", "2", "--positions", "document"]),
    "pp2": (2, ["--pp", "2"]),
    "pp2_vpp2": (2, ["--pp", "2", "--vpp", "2"]),
    "dp2_distopt": (2, ["--distributed-optimizer"]),
    "pp2_full_recompute": (2, ["--pp", "2", "--recompute", "full"]),
    "tp2_selective_recompute": (2, ["--tp", "2", "--sp", "--recompute", "selective"]),
    "tp2_pp2_dp2": (8, ["--tp", "2", "--pp", "2", "--sp", "--distributed-optimizer"]),
    # The GPU path's overlap (gradient reduction in backward, parameter all-gather in the next
    # forward), run with gloo: one chunk, and two virtual stages whose buckets chain.
    "dp2_distopt_overlap": (2, ["--distributed-optimizer", "--overlap"]),
    "pp2_vpp2_dp2_overlap": (4, ["--pp", "2", "--vpp", "2", "--distributed-optimizer",
                                 "--overlap"]),
}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    torchrun("engine.tools.layout_check", 1, ["--out", str(out)])
    return out


@pytest.fixture(scope="module")
def initial_weights(tmp_path_factory):
    """The weights before any step (canonical: a function of the seed alone, any layout)."""
    out = tmp_path_factory.mktemp("initial")
    torchrun("engine.tools.layout_check", 1, ["--steps", "0", "--out", str(out)])
    return load_full_weights(out)


def assert_every_weight_changed(run_dir, initial):
    """Every weight tensor of every replica moved from its initial value."""
    trained = load_full_weights(run_dir)
    assert set(trained) == set(initial)
    unchanged = [name for name, replicas in trained.items() for replica in replicas
                 if relative_error(replica, initial[name][0]) == 0]
    assert not unchanged, unchanged


@pytest.fixture(scope="module")
def reference_document_positions(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference_document_positions")
    torchrun("engine.tools.layout_check", 1, ["--positions", "document", "--out", str(out)])
    return out


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, reference_run, reference_document_positions,
                                       initial_weights, tmp_path):
    nproc, flags = LAYOUTS[name]
    torchrun("engine.tools.layout_check", nproc, [*flags, "--out", str(tmp_path)])
    reference = reference_document_positions if "document" in flags else reference_run
    errors = compare_runs(reference, tmp_path)
    assert errors["num_tokens"] == 0
    for key in ("loss", "grad_norm", "weights"):
        assert errors[key] <= DEFAULT_TOLERANCE, (name, key, errors)
    # The run really trained: the loss fell and every weight changed from its initial value.
    steps = json.loads((tmp_path / "steps.json").read_text())["steps"]
    assert steps[1]["loss"] < steps[0]["loss"]
    assert_every_weight_changed(tmp_path, initial_weights)


# bf16 keeps 8 significant bits: one rounding is at most 2^-9 relative, and a value's bf16
# neighbour is 2^-7 away at worst. Weights are stored in bf16 and every activation is rounded
# to it (fp32 accumulation), so after 2 steps a weight may differ from fp32's by a few
# roundings; the loss and grad norm are fp32 reductions over many bf16 terms whose roundings
# average out, so they stay within one rounding.
# Measured (2 steps, tiny model, CPU): loss 1.0e-4, grad norm 1.9e-4, weights 3.1e-3.
BF16_TOLERANCE = {"loss": 2 ** -9, "grad_norm": 2 ** -9, "weights": 2 ** -7}


def test_bf16_trains_like_fp32_within_bf16_precision(reference_run, tmp_path):
    torchrun("engine.tools.layout_check", 1, ["--bf16", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "steps.json").read_text())
    assert record["bf16"] is True
    errors = compare_runs(reference_run, tmp_path)
    assert errors["num_tokens"] == 0
    for key, tolerance in BF16_TOLERANCE.items():
        assert errors[key] <= tolerance, (key, errors)
    # It really ran in bf16: its weights are bf16-rounded, not the fp32 run's. (Not every
    # bf16 weight moves: a norm weight of 1.0 moved ~2e-4 by two steps at lr 1e-4 rounds back
    # to 1.0, whose bf16 neighbours are 2^-8 and 2^-7 away; its fp32 master copy moved.)
    assert errors["weights"] > 2 ** -12, errors


def test_comparison_catches_a_wrong_weight(reference_run, tmp_path):
    """A layout bug as small as one weight off by 1e-4 relative fails the comparison."""
    import shutil

    shutil.copytree(reference_run, tmp_path, dirs_exist_ok=True)
    record = torch.load(tmp_path / "weights_rank0.pt", weights_only=True)
    name = "decoder.layers.2.self_attention.linear_proj.weight"
    record["shards"][name] = record["shards"][name] * (1 + 1e-4)
    torch.save(record, tmp_path / "weights_rank0.pt")
    errors = compare_runs(reference_run, tmp_path)
    assert errors["weights"] > DEFAULT_TOLERANCE and errors["worst_weight"] == name


def test_reference_weights_are_canonical(reference_run):
    """Full weights are reassembled under the single-process names and shapes."""
    weights = load_full_weights(reference_run)
    qkv = weights["decoder.layers.0.self_attention.linear_qkv.weight"][0]
    # tiny: 4 query heads + 2 x 2 KV heads of dim 16, hidden 64.
    assert qkv.shape == (4 * 16 + 2 * 2 * 16, 64)
    assert weights["decoder.layers.3.mlp.linear_fc1.weight"][0].shape == (2 * 128, 64)
    assert weights["output_layer.weight"][0].shape == (512, 64)


def test_a_save_under_overlap_holds_the_trained_weights(tmp_path):
    """With the parameter all-gather overlapped, the full weights lag one step behind the
    optimizer until the next forward: the save gathers them first, so the checkpoint loads into
    a model without overlap as exactly the trained weights, and the next step's losses agree."""
    result = torchrun("tests.engine.overlap_save_worker", 2, [str(tmp_path / "ckpt")],
                      timeout=300)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["largest_difference"] == 0.0, report
    trained, loaded = report["losses"]
    assert trained == loaded, report
