"""The dry run (python -m engine.train --dry-run): a real-scale training step on the meta device
under a fake process group, failing wherever a GPU run would."""
import json
import sys
import textwrap

import pytest

from tests.distributed import REPO, run_command, test_env

STAGE1 = str(REPO / "engine" / "configs" / "prolong-stage1-64k.yaml")
STAGE2 = str(REPO / "engine" / "configs" / "prolong-stage2-512k.yaml")


def dry_run(*args, timeout=300, **env):
    return run_command([sys.executable, "-m", "engine.train", "--dry-run", *args], timeout,
                       env=test_env(**env))


@pytest.fixture
def tiny_config(tmp_path):
    """A tiny model under TP2 x CP2 (4 ranks), bf16 with the distributed optimizer; its head
    dim (16) is below what our attention kernel takes, so the attention is the reference's."""
    path = tmp_path / "tiny.yaml"
    path.write_text(textwrap.dedent("""\
        model: {name: tiny}
        parallel: {tensor_parallel: 2, context_parallel: 2, sequence_parallel: true,
                   distributed_optimizer: true, recompute: full}
        data: {path: unused, seq_length: 512, global_batch: 2, micro_batch: 1}
        checkpoint: {dir: unused}
        kernels: {attention: torch}
        bf16: true
        """))
    return str(path)


def planted(tmp_path, config, patch: str, *args):
    """The dry run of rank 0 in one process, with ``patch`` (Python) applied first."""
    script = tmp_path / "planted.py"
    script.write_text(f"import sys\n{patch}\nfrom engine.train import main\n"
                      f"sys.exit(main(sys.argv[1:]))\n")
    return run_command([sys.executable, str(script), "--dry-run", "--world-size", "4",
                        "--rank", "0", "--config", config, *args], 300,
                       env=test_env(ENGINE_DRY_RUN_CHILD="1"))


# The layouts engine.planner recommends for Llama-3-8B on 8 x 80 GB (python -m engine.planner
# --seq-length N --gpus 8 --gpu-memory-gb 80), as overrides of the stage configs.
PLANNER_LAYOUTS = {
    "64k": (STAGE1, ["parallel.tensor_parallel=4", "parallel.context_parallel=2",
                     "parallel.cp_algorithm=all-gather", "parallel.recompute=none"]),
    "512k": (STAGE2, ["parallel.tensor_parallel=2", "parallel.context_parallel=4",
                      "parallel.cp_algorithm=all-gather", "parallel.recompute=full"]),
}


# The stage configs as shipped (TP4 x CP2 and TP2 x CP4 Ulysses, both under full recompute).
PLANNER_LAYOUTS.update({"64k-shipped": (STAGE1, []), "512k-shipped": (STAGE2, [])})


@pytest.mark.parametrize("stage", sorted(PLANNER_LAYOUTS))
def test_llama3_8b_step_runs_and_memory_agrees_with_the_planner(stage, tmp_path):
    config, layout = PLANNER_LAYOUTS[stage]
    report = tmp_path / "report.json"
    # Three micro-batches: the peak of a PP1 layout must not grow with their count (a tracker
    # that keeps recomputed layers' tensors alive from one micro-batch to the next grew it by
    # 2 GiB per micro-batch at 64K).
    result = dry_run("--world-size", "8", "--config", config, *layout, "data.global_batch=3",
                     "--dry-run-report", str(report))
    assert result.returncode == 0, result.stdout[-4000:]
    ranks = json.loads(report.read_text())["ranks"]
    assert [r["stage"] for r in ranks] == ["first+last"]  # PP1: one rank is both
    for rank in ranks:
        peak, planner = rank["peak"], rank["planner"]
        # Weights, main gradients and sharded optimizer state are exact counts on both sides.
        for kind in ("weights", "gradients", "optimizer"):
            assert abs(peak[kind] - planner[kind]) <= 1e-3 * planner[kind], (kind, peak, planner)
        assert abs(peak["total"] / planner["total"] - 1) <= 0.10, (peak, planner)
        assert peak["activations"] > 0 and rank["flops_per_step"] > 0
        assert rank["cpu_seconds"] < 120
    assert "PREDICTION" in result.stdout


def test_pipeline_dry_run_covers_the_first_and_the_last_stage(tiny_config, tmp_path):
    report = tmp_path / "report.json"
    result = dry_run("--world-size", "8", "--config", tiny_config, "parallel.context_parallel=1",
                     "parallel.pipeline_parallel=2", "data.global_batch=8",
                     "--dry-run-report", str(report))
    assert result.returncode == 0, result.stdout[-4000:]
    ranks = json.loads(report.read_text())["ranks"]
    assert [(r["rank"], r["stage"]) for r in ranks] == [(0, "first"), (4, "last")]


def test_model_left_on_the_host_is_named(tmp_path, tiny_config):
    result = planted(tmp_path, tiny_config, "import engine.training.build as build\n"
                     "build.module_to_accelerator = lambda module: module")
    assert result.returncode == 1, result.stdout[-4000:]
    assert "error: dry run: parameter embedding.word_embeddings.weight [256x64]" in result.stdout
    assert "is on cpu when megatron's DDP wraps the model" in result.stdout
    assert "Traceback" not in result.stdout


def test_loss_sum_reduced_from_a_host_tensor_is_named(tmp_path, tiny_config):
    result = planted(tmp_path, tiny_config, "import torch\nimport engine.training.step as step\n"
                     "step.accelerator = lambda: torch.device('cpu')")
    assert result.returncode == 1, result.stdout[-4000:]
    assert "error: dry run: host tensor [2] float64 on cpu meets device tensors in aten::add_" \
        in result.stdout
    assert "engine/training/step.py" in result.stdout and "totals +=" in result.stdout


def test_checkpoint_state_built_from_a_host_tensor_is_named(tmp_path, tiny_config):
    """The state the first save builds (nothing written) is built after the step and checked."""
    result = planted(tmp_path, tiny_config, textwrap.dedent("""\
        import torch
        import engine.checkpoint as checkpoint
        built = checkpoint.sharded_state
        def slipped(chunks, optimizer=None, is_loading=False):
            weight = next(chunks[0].parameters())
            torch.ones(weight.shape, dtype=weight.dtype) + weight
            return built(chunks, optimizer, is_loading)
        checkpoint.sharded_state = slipped
        """))
    assert result.returncode == 1, result.stdout[-4000:]
    assert "error: dry run: host tensor [256x64] bfloat16 on cpu meets device tensors in " \
        "aten::add" in result.stdout
    assert "Traceback" not in result.stdout


def test_collective_handed_a_host_tensor_is_named(tmp_path):
    script = tmp_path / "collective.py"
    script.write_text(textwrap.dedent("""\
        import torch
        import torch.distributed as dist
        from torch.testing._internal.distributed.fake_pg import FakeStore
        from engine.simulation import DryRunError, DryRunMode
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
        with DryRunMode():
            dist.all_reduce(torch.zeros(2, device="meta"))  # a device tensor passes
            try:
                flags = torch.zeros(3)
                dist.all_reduce(flags)
            except DryRunError as error:
                print(error)
        """))
    result = run_command([sys.executable, str(script)], 120)
    assert "collective c10d::allreduce_ was handed a host tensor [3] float32 on cpu" \
        in result.stdout, result.stdout[-4000:]
    assert "collective.py:10 (dist.all_reduce(flags))" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--world-size", "6"], "6"),
    (["--world-size", "8", "--rank", "8"], "--rank 8 is outside the 8 ranks"),
    (["--world-size", "8", "parallel.context_parallel=1", "parallel.recompute=none"],
     "GiB per GPU"),
])
def test_bad_dry_run_input_exits_2_before_any_process_group(args, message):
    result = dry_run("--config", STAGE2, *args, timeout=120)
    assert result.returncode == 2, result.stdout[-4000:]
    assert message in result.stdout and "error:" in result.stdout
    assert "Traceback" not in result.stdout


def test_the_quickstart_configs_run_a_gpu_step():
    """Both quickstart stages (TP2 x PP2, head dim 32, the real 128,256-token vocabulary), first
    and last pipeline stage: a GPU run of them must not fail in its first step."""
    for stage in ("train-stage1.yaml", "train-stage2.yaml"):
        result = dry_run("--world-size", "4", "--config",
                         str(REPO / "examples" / "quickstart" / stage))
        assert result.returncode == 0, result.stdout[-4000:]
        assert "first pipeline stage" in result.stdout and "last pipeline stage" in result.stdout
        # The step's prediction is the slowest stage's, a share of the card's peak.
        mfu = float(result.stdout.split("PREDICTION for the step")[1].split("MFU ")[1]
                    .split("%")[0])
        assert 0 < mfu < 100, result.stdout[-2000:]
