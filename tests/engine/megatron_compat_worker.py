"""Worker for test_megatron_compat (one process under torchrun): is each problem that
engine.megatron_compat patches still there in the installed megatron-core?

Prints one JSON line: for the reshardable optimizer load, the error megatron's own copy raises
and whether the patched load restores Adam's state exactly; for the optimizer state allocation,
whether megatron can describe an empty distributed optimizer's state without it; whether
megatron's load shares one Adam step among the parameters, and the steps after the engine's
load and one more step; whether megatron's own param-group pairing refuses optimizer state saved
at another learning rate, and what the patched load restores; whether megatron's gradient
reduction asks for the current CUDA stream.
"""
import json
import sys
import tempfile
from dataclasses import replace

import torch


def main() -> None:
    import engine.checkpoint as checkpoint
    from engine.megatron_compat import _copy_present_states
    from engine.model.config import get_model_config
    from engine.model.kernel_choices import KernelChoices
    from engine.parallel.layout import ParallelLayout
    from engine.parallel.setup import initialize_parallel
    from engine.training.build import build_training_state
    from engine.training.data import build_micro_batch
    from engine.training.run_plan import RunPlan
    from engine.training.step import train_step
    from engine.megatron_compat import cuda_current_stream
    from engine.training.config import OptimizerSection
    from megatron.core.optimizer import distrib_optimizer, optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    # Before any load patches them: megatron's own param-group pairing keys.
    megatron_keys = {module: getattr(module, "param_group_identifier_keys", None)
                     for module in (optimizer, distrib_optimizer)}
    model = get_model_config("tiny", num_layers=2)
    plan = RunPlan.create(model, ParallelLayout(distributed_optimizer=True), seq_length=16,
                          global_batch=1, kernels=KernelChoices.parse("all=torch"),
                          collective_timeout_s=60)
    initialize_parallel(plan.layout, seed=plan.seed, timeout_s=60)
    trained = build_training_state(plan)
    batch = build_micro_batch([torch.arange(16).numpy()], [[16]])
    report = {}
    # 7. megatron's gradient reduction with torch's own current_stream on a CPU machine.
    patched_stream = torch.cuda.current_stream
    torch.cuda.current_stream = cuda_current_stream
    try:
        train_step(trained.chunks, trained.optimizer, trained.scheduler, [batch], 1, 16, 1)
        report["unpatched_stream_error"] = None
    except Exception as error:  # noqa: BLE001 - the kind of error is the finding
        report["unpatched_stream_error"] = f"{type(error).__name__}: {error}"[:300]
    finally:
        torch.cuda.current_stream = patched_stream
    trained = build_training_state(plan)
    train_step(trained.chunks, trained.optimizer, trained.scheduler, [batch], 1, 16, 1)
    with tempfile.TemporaryDirectory() as root:
        path = checkpoint.save_checkpoint(root, 1, trained.chunks, trained.optimizer,
                                          trained.scheduler, model, plan.layout, {})
        original = DistributedOptimizer._set_main_param_and_optimizer_states
        if original is _copy_present_states:
            original = _copy_present_states.original
        # 1. megatron's own copy: the load fails as the patch says it does.
        DistributedOptimizer._set_main_param_and_optimizer_states = original
        fresh = build_training_state(plan)
        patch = checkpoint.patch_reshardable_optimizer_load
        checkpoint.patch_reshardable_optimizer_load = lambda: None
        try:
            checkpoint.load_checkpoint(path, fresh.chunks, fresh.optimizer, model_config=model)
            report["unpatched_error"] = None
        except Exception as error:  # noqa: BLE001 - the kind of error is the finding
            report["unpatched_error"] = f"{type(error).__name__}: {error}"
        finally:
            checkpoint.patch_reshardable_optimizer_load = patch
        # 2. with the patch: Adam's moments come back exactly.
        fresh = build_training_state(plan)
        checkpoint.load_checkpoint(path, fresh.chunks, fresh.optimizer, model_config=model)

        def adam_states(optimizer):
            inner = optimizer.chained_optimizers[0] if hasattr(optimizer, "chained_optimizers") \
                else optimizer
            return list(inner.optimizer.state.values())

        def moments(optimizer):
            return [state[key] for state in adam_states(optimizer)
                    for key in ("exp_avg", "exp_avg_sq")]

        report["patched_restores_adam_state"] = all(
            torch.equal(a, b) for a, b in zip(moments(trained.optimizer), moments(fresh.optimizer)))
        # 4. megatron's load gives every parameter one shared Adam step tensor; the engine's
        # load gives each its own, so one more step counts once per parameter.
        shared = build_training_state(plan)
        untie = checkpoint.untie_adam_steps
        checkpoint.untie_adam_steps = lambda optimizer: 0
        try:
            checkpoint.load_checkpoint(path, shared.chunks, shared.optimizer, model_config=model)
        finally:
            checkpoint.untie_adam_steps = untie
        steps = [state["step"] for state in adam_states(shared.optimizer)]
        report["megatron_load_shares_adam_step"] = (
            len(steps) > 1 and len({id(step) for step in steps}) == 1)
        train_step(fresh.chunks, fresh.optimizer, fresh.scheduler, [batch], 1, 16, 1)
        report["adam_steps_after_one_more_step"] = sorted(
            {float(state["step"]) for state in adam_states(fresh.optimizer)})
        # 3. An empty distributed optimizer cannot describe its state for loading by itself.
        empty = build_training_state(plan)
        inner = empty.optimizer.chained_optimizers[0] if hasattr(
            empty.optimizer, "chained_optimizers") else empty.optimizer
        report["optimizer_state_empty_before_allocation"] = not inner.optimizer.state
        # 6. The next stage: the same model at three times the learning rate starts from this
        # optimizer state, with the distributed optimizer and with megatron's plain one.
        report["new_lr"] = {}
        plain_plan = replace(plan, layout=ParallelLayout(distributed_optimizer=False))
        for kind, saved_plan in (("distributed", plan), ("plain", plain_plan)):
            saved = build_training_state(saved_plan)
            train_step(saved.chunks, saved.optimizer, saved.scheduler, [batch], 1, 16, 1)
            saved_path = checkpoint.save_checkpoint(f"{root}/{kind}", 1, saved.chunks,
                                                    saved.optimizer, saved.scheduler, model,
                                                    saved_plan.layout, {})
            next_plan = replace(saved_plan, optimizer=OptimizerSection(
                lr=saved_plan.optimizer.lr * 3))
            result = {}
            patch = checkpoint.patch_param_group_matching
            patched_keys = {module: getattr(module, "param_group_identifier_keys", None)
                            for module in megatron_keys}
            for module, keys in megatron_keys.items():
                if keys is not None:
                    module.param_group_identifier_keys = keys
            checkpoint.patch_param_group_matching = lambda: None
            try:
                unpatched = build_training_state(next_plan)
                checkpoint.load_checkpoint(saved_path, unpatched.chunks, unpatched.optimizer,
                                           model_config=model)
                result["unpatched_error"] = None
            except Exception as error:  # noqa: BLE001 - the kind of error is the finding
                result["unpatched_error"] = f"{type(error).__name__}: {error}"[:300]
            finally:
                checkpoint.patch_param_group_matching = patch
                for module, keys in patched_keys.items():
                    if keys is not None:
                        module.param_group_identifier_keys = keys
            loaded = build_training_state(next_plan)
            result["max_lr_before_load"] = sorted(
                {group["max_lr"] for group in loaded.optimizer.param_groups})
            checkpoint.load_checkpoint(saved_path, loaded.chunks, loaded.optimizer,
                                       model_config=model)
            result["max_lr_after_load"] = sorted(
                {group["max_lr"] for group in loaded.optimizer.param_groups})
            saved_moments, loaded_moments = moments(saved.optimizer), moments(loaded.optimizer)
            result["restores_adam_state"] = len(saved_moments) == len(loaded_moments) > 0 and all(
                torch.equal(a, b) for a, b in zip(saved_moments, loaded_moments))
            result["saved_lr"] = saved_plan.optimizer.lr
            report["new_lr"][kind] = result
    print(json.dumps(report))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
