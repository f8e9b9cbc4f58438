"""Each patch in engine.megatron_compat is still needed, and still fits, in the installed
megatron-core: a release that fixes or moves what a patch replaces fails here, naming the patch,
instead of being patched twice in silence."""
import inspect
import json
import subprocess
import sys

import pytest
import torch

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


def test_reshardable_optimizer_load_still_needs_the_patch_and_the_patch_restores_adam():
    result = torchrun("tests.engine.megatron_compat_worker", 1, [], timeout=180)
    report = json.loads(result.stdout.strip().splitlines()[-1])
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
