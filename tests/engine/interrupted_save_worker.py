"""Worker for test_checkpoint_integrity's interrupted saves (torchrun, 1 process).

Saves a good step 1, then tries to save step 2 (after training a step more, so that its weights
differ) with an exception raised right after each step of save_checkpoint in turn: after the
tensors, the RNG file, the checksums, the engine state, the manifest, the publishing rename,
the ``latest`` pointer and the pruning; then with the disk full while megatron writes the
tensors; then saves step 3 for real. After each interrupted save it records what ``latest``
names, whether that checkpoint and step 1 verify, what is left in the checkpoint folder, and
whether a resume (load_newest_intact into deliberately scrambled weights) loads exactly the
weights of the checkpoint ``latest`` names. Any fork or child process during the saves is
recorded too (the tensor files must be written by this process). Prints one JSON report.
"""
import errno
import json
import os
import sys
from pathlib import Path

import numpy as np
import psutil
import torch
from megatron.core.dist_checkpointing.strategies import filesystem_async
from torch.distributed.checkpoint.api import CheckpointException

import engine.checkpoint as checkpoint
from engine.checkpoint import (CheckpointError, load_newest_intact, save_checkpoint,
                               verify_checkpoint)
from engine.model.config import get_model_config
from engine.model.kernel_choices import KernelChoices
from engine.parallel.layout import ParallelLayout
from engine.parallel.setup import destroy_parallel, initialize_parallel
from engine.training.build import build_training_state
from engine.training.data import build_micro_batch
from engine.training.run_plan import RunPlan
from engine.training.step import train_step

# Each step of save_checkpoint, as the attribute of engine.checkpoint (or of the object it
# calls) that performs it, in the order save_checkpoint runs them.
SAVE_STEPS = [
    ("tensors", checkpoint.dist_checkpointing, "save"),
    ("rng", checkpoint, "_save_rng"),
    ("checksums", checkpoint, "checksum_own_files"),
    ("engine_state", checkpoint, "_write_state"),
    ("manifest", checkpoint, "write_manifest"),
    ("publish", checkpoint, "publish_directory"),
    ("latest", checkpoint, "_point_latest"),
    ("prune", checkpoint, "_prune"),
]


class Interrupted(Exception):
    pass


def raising_after(name, original):
    def step(*args, **kwargs):
        original(*args, **kwargs)
        raise Interrupted(f"interrupted after {name}")
    return step


def main() -> None:
    root = Path(sys.argv[1])
    layout = ParallelLayout.for_world_size(1)
    plan = RunPlan.create(get_model_config("tiny", num_layers=2), layout, seq_length=32,
                          global_batch=1, kernels=KernelChoices.parse("all=torch"),
                          collective_timeout_s=60)
    initialize_parallel(plan.layout, seed=plan.seed, timeout_s=plan.collective_timeout_s)
    state = build_training_state(plan)
    chunks, optimizer = state.chunks, state.optimizer
    rng = np.random.default_rng(0)

    def train_one():
        batch = build_micro_batch([rng.integers(0, 512, 32)], [np.array([20, 12])])
        train_step(chunks, optimizer, state.scheduler, [batch], 1, 32, 1)

    def weights():
        return {name: p.detach().clone() for name, p in chunks[0].named_parameters()}

    forks = []
    real_fork = os.fork

    def counted_fork():
        forks.append(len(forks))
        return real_fork()

    os.fork = counted_fork

    def save(step):
        try:
            save_checkpoint(root, step, chunks, optimizer, state.scheduler, plan.model,
                            plan.layout, {"consumed_samples": step}, keep_last=2)
            return None
        except (Interrupted, CheckpointError, RuntimeError, CheckpointException) as error:
            return f"{type(error).__name__}: {error}"

    def children():
        return [p.pid for p in psutil.Process().children(recursive=True)]

    train_one()
    saved = {"step_00000001": weights()}
    report = {"first": save(1), "children": children(), "forks": len(forks), "cases": {}}

    def after(outcome):
        latest = (root / "latest").read_text().strip()
        case = {"outcome": outcome, "latest": latest,
                "contents": sorted(p.name for p in root.iterdir()),
                "step1_verifies": ((root / "step_00000001").exists()
                                   and verify_checkpoint(root / "step_00000001")),
                "children": children(), "forks": len(forks)}
        try:
            case["latest_verifies"] = verify_checkpoint(root / latest)
        except CheckpointError as error:
            case["latest_verifies"] = str(error)
        # A resume into scrambled weights must land on exactly what latest names.
        with torch.no_grad():
            for p in chunks[0].parameters():
                p.add_(1.0)
        try:
            loaded, _ = load_newest_intact(root, chunks, optimizer, state.scheduler,
                                           plan.model, plan.layout)
            case["resumed_from"] = loaded.name
            expected = saved.get(loaded.name)
            case["resumed_weights_equal"] = expected is not None and all(
                torch.equal(expected[n], p) for n, p in chunks[0].named_parameters())
        except CheckpointError as error:
            case["resumed_from"] = f"error: {error}"
        return case

    published = False
    for name, owner, attribute in SAVE_STEPS:
        train_one()
        attempt = weights()
        original = getattr(owner, attribute)
        setattr(owner, attribute, raising_after(name, original))
        try:
            outcome = save(2)
        finally:
            setattr(owner, attribute, original)
        published = published or name == "publish"
        if published:  # step_00000002 now holds this attempt's weights
            saved["step_00000002"] = attempt
        report["cases"][name] = after(outcome)

    write_item = filesystem_async._write_item

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(root / "__0_0.distcp"))

    train_one()  # the full disk keeps these weights out of every checkpoint
    filesystem_async._write_item = disk_full
    try:
        outcome = save(2)
    finally:
        filesystem_async._write_item = write_item
    report["cases"]["disk_full"] = after(outcome)

    train_one()
    saved["step_00000003"] = weights()
    report["last"] = save(3)
    report["after_last"] = after(None)
    os.fork = real_fork
    print(json.dumps(report), flush=True)
    destroy_parallel()


if __name__ == "__main__":
    main()
