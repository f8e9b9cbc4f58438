"""Memory planner: the CLI a user runs, its refusals, and its predictions against measurement."""
import json
import subprocess
import sys

import pytest

from engine.model.config import get_model_config
from engine.parallel.layout import ParallelLayout
from engine.planner.memory import GIB, Workload, estimate_memory
from engine.planner.plan import PlanError, check_fits, plan_layouts
from engine.training.config import load_config
from tests import distributed
from tests.distributed import run_command

# Stated bounds on the prediction error of the planner (bench/planner/RESULTS.md).
PARAMETER_ERROR = 0.0
ACTIVATION_ERROR_NO_RECOMPUTE = 0.01
ACTIVATION_ERROR_FULL_RECOMPUTE = 0.01


def _planner(*args):
    return run_command([sys.executable, "-m", "engine.planner", *args], timeout=60)


@pytest.mark.parametrize("gpus", [8, 64])
def test_llama3_8b_at_512k_has_a_recommended_layout(gpus):
    result = _planner("--model", "llama3-8b", "--seq-length", "524288", "--gpus", str(gpus),
                      "--gpu-memory-gb", "80")
    assert result.returncode == 0, result.stdout
    assert "recommended:" in result.stdout
    fitting, _ = plan_layouts(get_model_config("llama3-8b"), Workload(524288), gpus, 80)
    best = fitting[0]
    assert best.memory.total <= 72 * GIB and best.layout.context_parallel > 1
    assert best.layout.describe() in result.stdout
    # Every layout printed as fitting really is under the budget.
    assert all(p.memory.total <= 0.9 * 80 * GIB for p in fitting)


def layout(tp, pp, cp, dp, recompute):
    return ParallelLayout(tp, pp, cp, dp, sequence_parallel=tp > 1, distributed_optimizer=True,
                          recompute=recompute)


def test_breakdown_follows_the_layout():
    model = get_model_config("llama3-8b")
    work = Workload(524288)
    base = estimate_memory(model, layout(1, 1, 8, 1, "full"), work)
    # 8.03B parameters: bf16 weights 16 GB, fp32 gradients 32 GB on one TP/PP rank.
    assert base.weights == pytest.approx(2 * model.num_parameters(), rel=1e-3)
    assert base.gradients == 2 * base.weights
    # Optimizer state is sharded over DP x CP; activations over CP.
    assert base.optimizer == pytest.approx(12 * base.parameters / 8)
    half = estimate_memory(model, layout(1, 1, 4, 1, "full"), work)
    assert half.activations == pytest.approx(2 * base.activations, rel=0.05)
    none = estimate_memory(model, layout(1, 1, 8, 1, "none"), work)
    assert none.activations > 10 * base.activations
    unfused = estimate_memory(model, layout(1, 1, 8, 1, "full"),
                              Workload(524288, fused_cross_entropy=False))
    assert unfused.logits > 40 * base.logits  # 65,536 tokens x 128,256 vocab, whole


def test_a_layout_that_does_not_fit_names_values_and_fix():
    model = get_model_config("llama3-8b")
    with pytest.raises(PlanError, match=r"TP1 x PP1 x CP1 x DP8 \+DistOpt needs [\d.]+ GiB per "
                                        r"GPU at seq_length 524288.*80 GB GPUs leave 72.0 GiB: "
                                        r"raise context_parallel"):
        check_fits(model, layout(1, 1, 1, 8, "none"), Workload(524288), 80)
    result = _planner("--model", "llama3-70b", "--seq-length", "524288", "--gpus", "8")
    assert result.returncode == 1 and "no layout fits" in result.stdout
    assert "fix:" in result.stdout


def test_predictions_match_measured_cpu_memory(tmp_path):
    """Parameters exactly; decoder activations within the stated bounds (fp32, CPU)."""
    out = tmp_path / "measure.json"
    result = run_command([sys.executable, "-m", "engine.planner.measure", "--seq-lengths",
                          "512", "2048", "--out", str(out)], timeout=240,
                         env=distributed.test_env(OMP_NUM_THREADS=2))
    assert result.returncode == 0, result.stdout[-3000:]
    rows = json.loads(out.read_text())
    assert {(r["recompute"], r["seq_length"]) for r in rows} == {
        ("none", 512), ("none", 2048), ("full", 512), ("full", 2048)}
    for row in rows:
        assert abs(row["parameters_error"]) <= PARAMETER_ERROR
        assert abs(row["gradient_bytes_error"]) <= 0.01
        assert abs(row["optimizer_bytes_error"]) <= 0.01
        bound = (ACTIVATION_ERROR_NO_RECOMPUTE if row["recompute"] == "none"
                 else ACTIVATION_ERROR_FULL_RECOMPUTE)
        assert abs(row["activation_bytes_error"]) <= bound, row


def test_overrides_print_the_recommended_layout_as_train_settings():
    result = _planner("--model", "llama3-8b", "--seq-length", "524288", "--gpus", "64",
                      "--gpu-memory-gb", "80", "--overrides")
    assert result.returncode == 0, result.stdout
    best = plan_layouts(get_model_config("llama3-8b"), Workload(524288), 64, 80)[0][0].layout
    settings = dict(item.split("=", 1) for item in result.stdout.split())
    expected = {f"parallel.{key}": str(value).lower() if isinstance(value, bool) else str(value)
                for key, value in best.to_dict().items() if key != "data_parallel"}
    assert settings == expected and len(result.stdout.strip().splitlines()) == 1
    # They load as the train config's parallel section.
    config = load_config([], list(result.stdout.split()))
    assert config.parallel.context_parallel == best.context_parallel > 1
    assert config.parallel.recompute == best.recompute
    nothing = subprocess.run([sys.executable, "-m", "engine.planner", "--model", "llama3-70b",
                              "--seq-length", "524288", "--gpus", "8", "--overrides"],
                             capture_output=True, text=True, env=distributed.test_env(),
                             cwd=distributed.REPO, timeout=60)
    assert nothing.returncode == 1 and nothing.stdout == ""  # no settings a caller could take
    assert "no layout fits" in nothing.stderr and "fix:" in nothing.stderr
