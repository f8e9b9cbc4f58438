"""Checkpoints: megatron-core distributed checkpoints, published atomically, reshardable.

Layout on disk::

    ROOT/latest                   text: the name of the newest complete checkpoint
    ROOT/step_00000100/           megatron dist checkpoint (model + optimizer), plus
        engine_state.json         step, consumed samples, scheduler, model shape, layout
        rng/rank00003.pt          each rank's RNG states (exact resume in the same layout)

A checkpoint is written under ``ROOT/.tmp_step_*`` and renamed into place only once every rank
has finished, so a run killed mid-save never leaves a directory that looks complete. Model and
optimizer tensors are stored by global name and offset, so a checkpoint saved under one TP/PP
layout loads into another.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel

from engine.megatron_compat import (
    allocate_distributed_optimizer_state,
    patch_reshardable_optimizer_load,
    untie_adam_steps,
)
from engine.model.config import LlamaConfig
from engine.parallel.layout import ParallelLayout

LATEST = "latest"
STATE_FILE = "engine_state.json"
# Fields whose change makes weights incompatible; rope_base and context length may change.
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                "ffn_hidden_size", "vocab_size")


class CheckpointError(RuntimeError):
    pass


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _sharded_state(model_chunks, optimizer=None, is_loading: bool = False) -> dict:
    # Tensors are matched by global key and offset, not by dict path, so the chunk structure
    # may differ between the saving and the loading layout.
    model = {f"chunk{i}": _unwrap(chunk).sharded_state_dict()
             for i, chunk in enumerate(model_chunks)}
    state = {"model": model}
    if optimizer is not None:
        if is_loading:
            patch_reshardable_optimizer_load()
            allocate_distributed_optimizer_state(optimizer)
        # Nested per chunk: virtual stages on one rank share keys (at different offsets).
        # "fully_reshardable": the distributed optimizer stores per-parameter state (not its
        # flat buffers), so the checkpoint loads into any TP/PP/DP layout, optimizer included.
        state["optimizer"] = optimizer.sharded_state_dict(
            model, is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": "fully_reshardable"})
    return state


def _unwrap(chunk):
    """The GPTModel inside a DDP wrapper (its state-dict keys carry no "module." prefix)."""
    return getattr(chunk, "module", chunk)


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def save_checkpoint(root: str | Path, step: int, model_chunks, optimizer, scheduler,
                    model_config: LlamaConfig, layout: ParallelLayout,
                    train_state: dict[str, Any], keep_last: Optional[int] = None) -> Path:
    """Save model, optimizer, scheduler, RNG and ``train_state`` (data position etc.) of a run
    in ``layout``.

    Collective: every rank calls it. Returns the published directory.
    """
    root = Path(root)
    final = _step_dir(root, step)
    tmp = root / f".tmp_step_{step:08d}"
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # debris of an interrupted save
        tmp.mkdir(parents=True)
    _barrier()
    dist_checkpointing.save(_sharded_state(model_chunks, optimizer), str(tmp))
    (tmp / "rng").mkdir(exist_ok=True)  # after the save: megatron wants an empty directory
    torch.save(rng_state(), tmp / "rng" / f"rank{_rank():05d}.pt")
    _barrier()
    if _rank() == 0:
        state = {
            "step": step,
            "train_state": train_state,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "model_config": dataclasses.asdict(model_config),
            "world_size": layout.world_size,
            "layout": layout.to_dict(),
        }
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = root / f".{LATEST}.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / LATEST)
        if keep_last:
            for old in sorted(root.glob("step_*"))[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    """The newest complete checkpoint under ``root``, or None if there is none."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    if not (path / STATE_FILE).exists():
        raise CheckpointError(f"{pointer} names {path}, which has no {STATE_FILE}: the "
                              f"checkpoint is incomplete; point {pointer} at an earlier step_*")
    return path


def read_checkpoint_state(path: str | Path) -> dict:
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.exists():
        raise CheckpointError(f"{path} is not a checkpoint directory (no {STATE_FILE})")
    return json.loads(state_file.read_text())


def check_compatible(path: str | Path, model_config: LlamaConfig) -> dict:
    """Raise CheckpointError naming each shape field where checkpoint and config differ."""
    state = read_checkpoint_state(path)
    saved = state["model_config"]
    mismatches = [f"{field}: checkpoint {saved[field]} vs config {getattr(model_config, field)}"
                  for field in SHAPE_FIELDS if saved[field] != getattr(model_config, field)]
    if mismatches:
        raise CheckpointError(
            f"checkpoint {path} holds a different model shape ({'; '.join(mismatches)}): load it "
            f"with the model config it was trained with")
    return state


def load_checkpoint(path: str | Path, model_chunks, optimizer=None, scheduler=None,
                    model_config: Optional[LlamaConfig] = None,
                    layout: Optional[ParallelLayout] = None) -> dict:
    """Load a checkpoint into this rank's model (and optimizer and scheduler if given).

    The saving layout may differ from the current one. Each rank's RNG states are restored only
    when ``layout`` is given and its sizes equal the saving layout's (the same rank then holds the
    same shard; in another layout a rank's saved RNG belongs to another position). Returns the
    saved engine state (step, train_state, ...).
    """
    path = Path(path)
    state = check_compatible(path, model_config) if model_config else read_checkpoint_state(path)
    if optimizer is not None and state.get("weights_only"):
        raise CheckpointError(
            f"{path} holds weights only, no optimizer state (e.g. imported from Hugging Face): "
            f"load it with optimizer=None (engine.train: checkpoint.init_load_optimizer: false) "
            f"and start a fresh optimizer")
    sharded = _sharded_state(model_chunks, optimizer, is_loading=True)
    loaded = dist_checkpointing.load(sharded, str(path))
    for chunk, chunk_state in zip(model_chunks, loaded["model"].values()):
        _unwrap(chunk).load_state_dict(chunk_state)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
        untie_adam_steps(optimizer)
    if scheduler is not None and state.get("scheduler"):
        scheduler.load_state_dict(state["scheduler"])
    rng_file = path / "rng" / f"rank{_rank():05d}.pt"
    if layout is not None and same_sizes(state.get("layout", {}), layout) and rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state


_SIZES = ("tensor_parallel", "pipeline_parallel", "context_parallel", "data_parallel",
          "virtual_stages")


def same_sizes(saved_layout: dict, layout: ParallelLayout) -> bool:
    """Whether a checkpoint's saved layout has ``layout``'s parallel sizes (same rank placement)."""
    current = layout.to_dict()
    return all(saved_layout.get(name, 1) == current[name] for name in _SIZES)
