"""The training entry point: ``torchrun --nproc-per-node N -m engine.train --config FILE [k=v ...]``.

Reads YAML configs (engine/configs/), builds and validates the run plan before any process
group exists, trains with megatron-core's schedules under the planned TP/PP/CP/DP layout, logs to
the console, metrics.jsonl and TensorBoard, checkpoints atomically, resumes from the newest
intact checkpoint of its directory at the saved data position, skips NaN steps, and on SIGTERM
saves and exits 0.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import yaml
from megatron.core import parallel_state

from data_tools.packed_dataset import PackedDataset
from engine.checkpoint import (
    CheckpointError,
    good_checkpoint_hint,
    latest_checkpoint,
    load_checkpoint,
    load_newest_intact,
    save_checkpoint,
)
from engine.device import accelerator
from engine.dryrun import DryRunError, check_dry_run, default_ranks, run
from engine.evaluate.errors import EvaluationError
from engine.evaluate.report import check_report_folder
from engine.evaluate.validation import Validation
from engine.parallel.layout import LayoutError, ParallelLayout
from engine.parallel.param_sync import parameters_current
from engine.parallel.setup import (
    LaunchError,
    check_rendezvous_port,
    destroy_parallel,
    initialize_parallel,
)
from engine.simulation import add_dry_run_arguments
from engine.training.build import TrainingState, build_training_state
from engine.training.config import ConfigError, TrainConfig, load_config
from engine.training.data import (
    SampleSource,
    attention_imbalance,
    global_batch_indices,
    rank_micro_batches,
)
from engine.training.metrics import (
    MetricsLogger,
    is_logging_rank,
    peak_memory_gb,
    print0,
    training_flops,
)
from engine.training.run_plan import RunPlan, plan_from_config
from engine.training.step import train_step
from publishing.atomic import write_text_atomically


class TrainingStopped(RuntimeError):
    pass


def _any_rank(flag: bool) -> bool:
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _start(plan: RunPlan, state: TrainingState) -> tuple[int, int, int]:
    """(step, consumed samples, skipped steps so far) to start at: resume this run from its
    newest intact checkpoint, start from another run's checkpoint (a new stage), or start
    fresh."""
    ckpt_dir = Path(plan.checkpoint.dir)
    resumed = load_newest_intact(ckpt_dir, state.chunks, state.optimizer, state.scheduler,
                                 plan.model, plan.layout)
    if resumed is not None:
        path, saved = resumed
        step = saved["step"]
        consumed = saved["train_state"].get("consumed_samples", step * plan.global_batch)
        print0(f"resumed from {path} at step {step} ({consumed} samples consumed)")
        if not saved["rng_restored"]:
            saved_layout = ParallelLayout.from_dict(saved.get("layout", {}))
            # Each rank's saved RNG belongs to its position in the saving layout.
            print0(f"RNG states not restored (checkpoint layout {saved_layout.describe()}, this "
                   f"run {plan.layout.describe()}; restored only for equal sizes): weights, "
                   f"optimizer and data position resume exactly, random streams from the seed")
        return step, consumed, saved.get("skipped_steps_total", 0)
    if plan.checkpoint.init_from:
        init = latest_checkpoint(plan.checkpoint.init_from) or Path(plan.checkpoint.init_from)
        # megatron keeps each group's max_lr/min_lr inside the optimizer state; the loaded ones
        # are the old run's, and this run's schedule must win.
        new_limits = [(g.get("max_lr"), g.get("min_lr")) for g in state.optimizer.param_groups]
        load_checkpoint(init, state.chunks,
                        state.optimizer if plan.checkpoint.init_load_optimizer else None,
                        scheduler=None, model_config=plan.model)
        if not plan.checkpoint.init_load_optimizer:
            # With 16-bit weights the optimizer holds fp32 master copies made at construction
            # from the random init; they must take the loaded weights, or the first step
            # would write the random init back.
            state.optimizer.reload_model_params()
        for group, (max_lr, min_lr) in zip(state.optimizer.param_groups, new_limits):
            group["max_lr"], group["min_lr"] = max_lr, min_lr
        state.scheduler.step(increment=0)  # sets this run's first learning rate
        print0(f"initialized from {init} (optimizer state: "
               f"{plan.checkpoint.init_load_optimizer}); new RoPE base {plan.model.rope_base:g}")
    return 0, 0, 0


def train(plan: RunPlan, config: TrainConfig, validation: Optional[Validation] = None,
          verbose: bool = False) -> int:
    """Run ``plan`` to its last step (``config`` is recorded beside the logs as resolved, and
    printed too when ``verbose``), evaluating as ``validation`` (the config's eval section)
    asks."""
    samples = SampleSource(PackedDataset(plan.data.path), plan.seq_length)
    stop_requested = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop_requested.__setitem__("flag", True))

    initialize_parallel(plan.layout, seed=plan.seed, timeout_s=plan.collective_timeout_s)
    ckpt_dir = Path(plan.checkpoint.dir)
    log_dir = Path(plan.logging.dir or ckpt_dir)
    state = build_training_state(plan)
    step, consumed, skipped_total = _start(plan, state)
    if is_logging_rank():
        # Written once the run is known to start (a refused resume keeps the run's own
        # config.yaml), and whole: a kill mid-write leaves the previous one.
        log_dir.mkdir(parents=True, exist_ok=True)
        resolved = yaml.safe_dump(config.to_dict(), sort_keys=False)
        write_text_atomically(log_dir / "config.yaml", resolved)
        # The whole config would push the loss lines off a user's screen; the file holds it.
        print(f"run plan: {plan.describe()}; resolved config: {log_dir / 'config.yaml'}",
              flush=True)
        if verbose:
            print(f"resolved config:\n{resolved}", flush=True)
    skipped_since_save = 0
    dp_rank = parallel_state.get_data_parallel_rank()
    cp_rank = parallel_state.get_context_parallel_rank()
    logger = MetricsLogger(log_dir, plan.train_steps, plan.logging.tensorboard)
    world_size = plan.layout.world_size
    consecutive_nan = 0
    try:
        while step < plan.train_steps:
            started = time.perf_counter()
            indices = global_batch_indices(consumed, plan.global_batch)
            new_pass = samples.pass_started(consumed, plan.global_batch)
            if new_pass:
                print0(f"warning: step {step + 1} starts pass {new_pass} over {plan.data.path} "
                       f"({samples.num_samples} samples of {plan.seq_length} tokens per pass): "
                       f"samples repeat from here on")
            micro_batches, doc_lengths, slots = rank_micro_batches(
                samples, indices, data_parallel=plan.layout.data_parallel, dp_rank=dp_rank,
                cp_size=plan.layout.context_parallel, cp_rank=cp_rank,
                num_microbatches=plan.num_microbatches, micro_batch=plan.micro_batch,
                position_mode=plan.data.position_mode,
                mask_cross_document=plan.data.mask_cross_document,
                balance_attention=plan.data.balance_attention)
            if step in plan.inject_nan_steps:
                micro_batches[0].inject_nan = True
            result = train_step(state.chunks, state.optimizer, state.scheduler, micro_batches,
                                plan.num_microbatches, plan.seq_length, plan.micro_batch)
            elapsed = time.perf_counter() - started
            step += 1
            consumed += plan.global_batch
            if step % plan.logging.interval == 0 or result.skipped:
                flops = sum(training_flops(plan.model, lengths) for lengths in doc_lengths)
                logger.log({
                    "step": step, "loss": result.loss, "lr": result.lr,
                    "grad_norm": result.grad_norm, "valid_tokens": result.num_tokens,
                    "consumed_samples": consumed,
                    "attention_imbalance": attention_imbalance(doc_lengths, slots),
                    "tokens_per_s": plan.global_batch * plan.seq_length / elapsed,
                    "tflops_per_gpu": flops / elapsed / world_size / 1e12,
                    "memory_gb": peak_memory_gb(), "step_time_s": elapsed,
                    "skipped": result.skipped,
                })
            consecutive_nan = consecutive_nan + 1 if result.skipped else 0
            skipped_since_save += result.skipped
            skipped_total += result.skipped
            if consecutive_nan >= plan.max_consecutive_nan_steps:
                raise TrainingStopped(
                    f"{consecutive_nan} consecutive steps had a non-finite loss (last: step "
                    f"{step}); stopping. Check the data at these steps and lower optimizer.lr. "
                    f"{good_checkpoint_hint(ckpt_dir)}")
            interval = plan.checkpoint.save_interval
            stop = _any_rank(stop_requested["flag"])
            if stop or step == plan.train_steps or (interval and step % interval == 0):
                path = save_checkpoint(ckpt_dir, step, state.chunks, state.optimizer,
                                       state.scheduler, plan.model, plan.layout,
                                       {"consumed_samples": consumed},
                                       keep_last=plan.checkpoint.keep_last,
                                       skipped_steps=skipped_since_save,
                                       skipped_steps_total=skipped_total,
                                       tokenizer=plan.data.tokenizer if plan.data else None)
                skipped_since_save = 0
                print0(f"saved {path}")
            if stop:
                print0(f"SIGTERM received: checkpoint saved at step {step}, exiting")
                break
            if validation is not None and validation.due(step, plan.train_steps):
                with parameters_current(state.chunks):
                    logger.log_eval(step, validation.run(state.chunks))
        if validation is not None and validation.section.final and step == plan.train_steps:
            with parameters_current(state.chunks):
                files = validation.final_report(state.chunks, ckpt_dir.name,
                                                str(latest_checkpoint(ckpt_dir)),
                                                final_report_folder(plan))
            if files:
                print0(f"final evaluation: {files['report.md']}")
    finally:
        logger.close()
    destroy_parallel()
    return 0


def _world_size(args) -> int:
    if args.world_size is None:
        return int(os.environ.get("WORLD_SIZE", "1"))
    if args.world_size < 1:
        raise ConfigError(f"--world-size {args.world_size}: give the run's number of processes "
                          f"(>= 1)")
    return args.world_size


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Train Llama-3 to long context (launch with torchrun).",
        epilog="Overrides: section.key=value, e.g. optimizer.lr=2e-5 parallel.tensor_parallel=2")
    parser.add_argument("--config", action="append", default=[], required=True,
                        help="YAML config; several are merged in order")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    parser.add_argument("--verbose", action="store_true",
                        help="also print the resolved config (always written to LOG_DIR/"
                             "config.yaml, LOG_DIR being logging.dir, else checkpoint.dir)")
    parser.add_argument("--check", action="store_true",
                        help="only check the run (config, data, layout, checkpoints, eval) for "
                             "--world-size processes, in this one process without any process "
                             "group, and exit: 0 if it would start, 2 naming the problem")
    add_dry_run_arguments(parser, "run one training step of the config as rank(s) of "
                          "--world-size on the meta device, without data or a GPU "
                          "(engine.dryrun), and report peak memory, FLOPs and a predicted step "
                          "time")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        world_size = _world_size(args)
        if args.dry_run:
            return dry_run(config, world_size, args.rank, args.dry_run_report)
        # Every check that needs no process group, first.
        plan = plan_from_config(config, world_size)
        validation = Validation.prepare(config.eval, plan)
        if validation is not None and validation.section.final:
            check_final_report_folder(plan)
        check_rendezvous_port()
        if args.check:
            print(f"run plan ok: {plan.describe()}", flush=True)
            return 0
        return train(plan, config, validation, args.verbose)
    except (ConfigError, LayoutError, CheckpointError, LaunchError, TrainingStopped) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2


def final_report_folder(plan: RunPlan) -> Path:
    """Where eval.final publishes the final checkpoint's report: LOG_DIR/eval."""
    return Path(plan.logging.dir or plan.checkpoint.dir) / "eval"


def check_final_report_folder(plan: RunPlan) -> None:
    """The final report can be published where it goes: refused now, not after the last step."""
    folder = final_report_folder(plan)
    try:
        check_report_folder(str(folder), "eval.final's report folder")
    except EvaluationError as error:
        raise ConfigError(f"{error} (eval.final writes into logging.dir, else checkpoint.dir, "
                          f"under eval/)") from None


def dry_run(config: TrainConfig, world_size: int, rank: Optional[int],
            report: Optional[str]) -> int:
    """``--dry-run``: every check first (no data needed), then engine.dryrun."""
    # Kernels resolved for the simulated GPU: the ones a GPU run chooses (csrc's custom ops
    # run their shape-only implementations on meta).
    plan = plan_from_config(config, world_size, device=torch.device("meta"), with_data=False)
    if rank is not None and not 0 <= rank < world_size:
        raise ConfigError(f"--rank {rank} is outside the {world_size} ranks of "
                          f"{plan.layout.describe()}: pick 0..{world_size - 1}")
    check_dry_run(plan)
    try:
        return run(plan, world_size, [rank] if rank is not None else default_ranks(plan.layout),
                   report)
    except DryRunError as error:
        print(f"error: dry run: {error}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
