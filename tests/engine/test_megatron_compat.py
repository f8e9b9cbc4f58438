"""Each patch in engine.megatron_compat is still needed, and still fits, in the installed
megatron-core: a release that fixes or moves what a patch replaces fails here, naming the patch,
instead of being patched twice in silence."""
import inspect
import json
import subprocess
import sys

import pytest
import torch
from packaging.version import Version

from engine import megatron_compat
from tests.distributed import REPO, free_port, test_env, torchrun


def test_the_installed_megatron_core_is_a_checked_release():
    assert megatron_compat.megatron_version() in megatron_compat.CHECKED_VERSIONS, (
        f"megatron-core {megatron_compat.megatron_version()} is not one the patches in "
        f"engine/megatron_compat.py were checked on {megatron_compat.CHECKED_VERSIONS}: run this "
        f"file's tests, re-read each patched function, then add the version")


def test_patched_functions_keep_the_signatures_the_patches_replace():
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.tensor_parallel import random as megatron_random

    assert list(inspect.signature(megatron_random._get_cuda_rng_state).parameters) == [
        "device", "clone", "graph_safe"]
    assert list(inspect.signature(megatron_random._set_cuda_rng_state).parameters) == [
        "new_state", "device", "graph_safe"]
    method = DistributedOptimizer.__dict__["_set_main_param_and_optimizer_states"]
    if method is megatron_compat._copy_present_states:
        method = megatron_compat._copy_present_states.original
    assert list(inspect.signature(method).parameters) == ["self", "model_param", "tensors"]
    # megatron's copy takes every destination key from the checkpoint's tensors.
    assert "dst_tensors[key].copy_(tensors[key])" in inspect.getsource(method)
    assert callable(DistributedOptimizer._init_optimizer_states_with_dummy_values)


def test_megatron_without_cpu_support_cannot_seed_its_rng_on_a_cpu_machine():
    """The problem patch 1 solves: megatron's model-parallel RNG wants CUDA generators."""
    code = ("import os, torch, torch.distributed as dist\n"
            "from megatron.core import parallel_state, tensor_parallel\n"
            "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=os.environ['PORT'])\n"
            "dist.init_process_group('gloo', rank=0, world_size=1)\n"
            "parallel_state.initialize_model_parallel()\n"
            "try:\n"
            "    tensor_parallel.model_parallel_cuda_manual_seed(1)\n"
            "    tensor_parallel.get_cuda_rng_tracker().get_states()\n"
            "    with tensor_parallel.get_cuda_rng_tracker().fork():\n"
            "        pass\n"
            "except Exception as error:\n"
            "    print('FAILS', type(error).__name__)\n"
            "else:\n"
            "    print('WORKS')\n"
            "from engine.megatron_compat import enable_cpu_support\n"
            "assert enable_cpu_support()\n"
            "tensor_parallel.model_parallel_cuda_manual_seed(1)\n"
            "with tensor_parallel.get_cuda_rng_tracker().fork():\n"
            "    torch.randn(2)\n"
            "print('PATCHED WORKS')\n")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: there is nothing to route to the CPU")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO,
                            env=test_env(PORT=free_port()),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "FAILS" in result.stdout, ("megatron now seeds its RNG without CUDA: CPU support "
                                      "patch 1 may no longer be needed\n" + result.stdout)
    assert "PATCHED WORKS" in result.stdout


@pytest.fixture(scope="module")
def worker_report() -> dict:
    result = torchrun("tests.engine.megatron_compat_worker", 1, [], timeout=300)
    return json.loads(result.stdout.strip().splitlines()[-1])


def megatron_at_least(release: str) -> bool:
    return Version(megatron_compat.megatron_version()) >= Version(release)


def test_reshardable_optimizer_load_still_needs_the_patch_and_the_patch_restores_adam(
        worker_report):
    report = worker_report
    assert report["unpatched_error"] and "KeyError" in report["unpatched_error"] and (
        "step" in report["unpatched_error"]), (
        f"megatron's own load no longer fails as patch 2 says ({report['unpatched_error']}): "
        f"drop patch_reshardable_optimizer_load if it now restores the state itself")
    assert report["patched_restores_adam_state"]
    assert report["optimizer_state_empty_before_allocation"]
    assert report["megatron_load_shares_adam_step"], (
        "megatron's distributed-optimizer load no longer gives every parameter one shared Adam "
        "step tensor: drop untie_adam_steps (patch 4)")
    # Saved after step 1; one more step after loading: every parameter is at step 2.
    assert report["adam_steps_after_one_more_step"] == [2.0]


def test_tensor_parallel_marks_are_set_where_missing_and_must_agree_where_megatron_set_them():
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    def marks(param):
        return param.tensor_model_parallel, param.partition_dim, param.partition_stride

    # megatron-core <= 0.17 leaves a weight it did not initialize unmarked.
    gate_up = torch.nn.Parameter(torch.zeros(8, 4))
    megatron_compat.mark_tensor_parallel("decoder.layers.0.mlp.linear_fc1.weight", gate_up, 0, 2)
    assert marks(gate_up) == (True, 0, 2)
    # >= 0.18 has marked it already: the same marks pass, and stay.
    megatron_compat.mark_tensor_parallel("decoder.layers.0.mlp.linear_fc1.weight", gate_up, 0, 2)
    assert marks(gate_up) == (True, 0, 2)
    norm = torch.nn.Parameter(torch.ones(4))
    megatron_compat.mark_tensor_parallel("decoder.final_layernorm.weight", norm, None, 1)
    assert marks(norm) == (False, 0, 1)
    # Marks that disagree with the engine's sharding stop the build, naming the parameter.
    proj = torch.nn.Parameter(torch.zeros(4, 4))
    set_tensor_model_parallel_attributes(proj, is_parallel=True, dim=0, stride=1)
    with pytest.raises(RuntimeError, match=r"linear_proj\.weight as .*\(True, 0, 1\).* says "
                                           r"\(True, 1, 1\)"):
        megatron_compat.mark_tensor_parallel("decoder.layers.0.self_attention.linear_proj.weight",
                                             proj, 1, 1)


@pytest.mark.parametrize("kind", ["distributed", "plain"])
def test_a_stage_starts_from_optimizer_state_saved_at_another_learning_rate(worker_report, kind):
    """Patch 6: megatron-core >= 0.19 pairs param groups by a key holding max_lr/min_lr."""
    result = worker_report["new_lr"][kind]
    if megatron_at_least("0.19"):
        expected = "KeyError" if kind == "distributed" else "ValueError"
        assert result["unpatched_error"] and result["unpatched_error"].startswith(expected), (
            f"megatron-core {megatron_compat.megatron_version()} now loads optimizer state saved "
            f"at another learning rate ({result['unpatched_error']}): drop "
            f"patch_param_group_matching (patch 6)")
    else:
        assert result["unpatched_error"] is None, result["unpatched_error"]
    # The load restores Adam exactly and the saved schedule values; engine.train then puts the
    # new stage's back.
    assert result["restores_adam_state"]
    assert result["max_lr_before_load"] == [pytest.approx(3 * result["saved_lr"])]
    assert result["max_lr_after_load"] == [pytest.approx(result["saved_lr"])]


def test_patched_param_group_key_leaves_out_only_the_schedule_values():
    from megatron.core.optimizer import distrib_optimizer, optimizer

    megatron_compat.patch_param_group_matching()
    for module in (optimizer, distrib_optimizer):
        keys = getattr(module, "param_group_identifier_keys", None)
        if keys is None:
            assert not megatron_at_least("0.19")
            continue
        assert not set(keys) & set(megatron_compat.SCHEDULE_KEYS)
        # What says which parameters a group holds stays in the key.
        assert {"wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr"} <= set(keys)


def test_gradient_reduction_on_a_cpu_machine_needs_the_cpu_stream(worker_report):
    """Patch 7: megatron-core >= 0.19 asks for the current CUDA stream in every reduction."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: there is nothing to route to the CPU")
    error = worker_report["unpatched_stream_error"]
    if megatron_at_least("0.19"):
        assert error, ("megatron's gradient reduction no longer asks for the current CUDA stream "
                       "on a CPU machine: drop give_cuda_a_cpu_stream (patch 7)")
    else:
        assert error is None, error


def test_untested_versions_warn_in_one_line_naming_the_tested_ones():
    tested_torch = megatron_compat.TESTED_TORCH[-1]
    tested_megatron = megatron_compat.CHECKED_VERSIONS[-1]
    assert megatron_compat.untested_versions(f"{tested_torch}.1", tested_megatron) is None
    # A local build of a tested release (NGC's pre-releases, +cpu wheels) counts as tested.
    for build in (f"{tested_torch}.0a0+nv26.4", f"{tested_torch}.0+cpu"):
        assert megatron_compat.untested_versions(build, tested_megatron) is None
    message = megatron_compat.untested_versions("2.99.1", "0.19.7")
    assert "\n" not in message
    assert "torch 2.99.1" in message and "megatron-core 0.19.7" in message
    for version in megatron_compat.TESTED_TORCH + megatron_compat.CHECKED_VERSIONS:
        assert version in message


@pytest.mark.parametrize("rank, warns", [("0", True), ("1", False)])
def test_the_version_warning_comes_from_the_first_rank_only(monkeypatch, capsys, rank, warns):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(megatron_compat.torch, "__version__", "2.99.1")
    megatron_compat.warn_untested_versions()
    err = capsys.readouterr().err
    assert ("untested torch 2.99.1" in err) == warns
    assert err.count("\n") == int(warns)
