"""Checkpoints: megatron-core distributed checkpoints, published atomically, reshardable,
checksummed.

Layout on disk::

    ROOT/latest                   text: the name of the newest complete checkpoint
    ROOT/step_00000100/           megatron dist checkpoint (model + optimizer), plus
        engine_state.json         step, consumed samples, scheduler, model shape, layout,
                                  skipped (non-finite) steps
        rng/rank00003.pt          each rank's RNG states (exact resume in the same layout)
        manifest.json             size and block checksums of every other file (integrity.py)
    ROOT/damaged_step_00000200/   a checkpoint a resume found damaged, set aside (never deleted)

A checkpoint is written under ``ROOT/.tmp_step_*`` and renamed into place only once every rank
has finished and its manifest is written, so a run killed mid-save never leaves a directory
that looks complete. Model and optimizer tensors are stored by global name and offset, so a
checkpoint saved under one TP/PP layout loads into another.

Nothing non-finite is saved or loaded: a save refuses NaN/Inf weights or optimizer state, a
load checks every file against the manifest and the loaded tensors for NaN/Inf. A resume skips
a damaged checkpoint for the newest intact one before it (load_newest_intact).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel

from data_tools.jsonfile import read_json_object
from engine.checkpoint.errors import CheckpointError, DamagedCheckpoint
from engine.checkpoint.integrity import (
    MANIFEST_FILE,
    check_against_manifest,
    checksum_own_files,
    nonfinite_tensors,
    read_manifest,
    write_manifest,
)
from engine.checkpoint.writer import take_write_failure, write_in_process
from engine.megatron_compat import (
    allocate_distributed_optimizer_state,
    patch_param_group_matching,
    patch_reshardable_optimizer_load,
    untie_adam_steps,
)
from engine.model.config import LlamaConfig
from engine.parallel.layout import ParallelLayout
from engine.parallel.param_sync import parameters_current
from publishing.atomic import publish_directory, write_text_atomically

LATEST = "latest"
STATE_FILE = "engine_state.json"
DAMAGED_PREFIX = "damaged_"
_STEP_NAME = re.compile(r"step_(\d{8})")
# Fields whose change makes weights incompatible; rope_base and context length may change.
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                "ffn_hidden_size", "vocab_size", "kv_channels", "untie_embeddings")
# Shape fields that checkpoints from before the field existed do not record: their defaults.
_SHAPE_DEFAULTS = {"kv_channels": None, "untie_embeddings": True}


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def published_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, directory) of every published checkpoint under ``root``, oldest first (not
    checked: see verify_checkpoint)."""
    root = Path(root)
    found = [(int(match.group(1)), path) for path in root.glob("step_*")
             if (match := _STEP_NAME.fullmatch(path.name)) and path.is_dir()]
    return sorted(found)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _print0(message: str) -> None:
    if _rank() == 0:
        print(message, flush=True)


def _all_gather(value) -> list:
    if not dist.is_initialized():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _listing(tensors: list[str], shown: int = 5) -> str:
    more = f" and {len(tensors) - shown} more tensors" if len(tensors) > shown else ""
    return "; ".join(tensors[:shown]) + more


def _point_latest(root: Path, name: str) -> None:
    write_text_atomically(root / LATEST, name + "\n")


def sharded_state(model_chunks, optimizer=None, is_loading: bool = False) -> dict:
    """What a save hands megatron's dist_checkpointing (and a load fills): the model's and the
    optimizer's sharded state dicts. Building it writes nothing (the dry run builds it alone)."""
    # Tensors are matched by global key and offset, not by dict path, so the chunk structure
    # may differ between the saving and the loading layout.
    model = {f"chunk{i}": _unwrap(chunk).sharded_state_dict()
             for i, chunk in enumerate(model_chunks)}
    state = {"model": model}
    if optimizer is not None:
        if is_loading:
            patch_reshardable_optimizer_load()
            patch_param_group_matching()
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
                    train_state: dict[str, Any], keep_last: Optional[int] = None,
                    skipped_steps: int = 0, skipped_steps_total: int = 0,
                    tokenizer: Optional[dict] = None) -> Path:
    """Save model, optimizer, scheduler, RNG and ``train_state`` (data position etc.) of a run
    in ``layout``; ``skipped_steps``: steps skipped for a non-finite loss since the previous
    checkpoint, ``skipped_steps_total``: since the run began (both decide what keep_last keeps).
    ``tokenizer``: the record (TextTokenizer.describe()) of the tokenizer of the run's ids, so
    that continuing or evaluating on other ids can be refused.

    Collective: every rank calls it. Returns the published directory. Raises CheckpointError,
    before writing anything, if a weight or optimizer tensor holds NaN or Inf. Parameters whose
    all-gather overlaps the forward are gathered first (engine.parallel.param_sync).
    """
    with parameters_current(model_chunks):
        return _save_checkpoint(Path(root), step, model_chunks, optimizer, scheduler,
                                model_config, layout, train_state, keep_last, skipped_steps,
                                skipped_steps_total, tokenizer)


def _save_checkpoint(root: Path, step: int, model_chunks, optimizer, scheduler,
                     model_config: LlamaConfig, layout: ParallelLayout,
                     train_state: dict[str, Any], keep_last: Optional[int],
                     skipped_steps: int, skipped_steps_total: int,
                     tokenizer: Optional[dict]) -> Path:
    nonfinite = nonfinite_tensors(model_chunks, optimizer)
    if nonfinite:
        raise CheckpointError(
            f"refusing to save step {step} into {root}: NaN or Inf in {_listing(nonfinite)}. "
            f"{good_checkpoint_hint(root)}")
    final = _step_dir(root, step)
    tmp = root / f".tmp_step_{step:08d}"
    write_in_process()  # no forked writer to outlive this process
    try:
        _save_into(tmp, final, root, step, model_chunks, optimizer, scheduler, model_config,
                   layout, train_state, keep_last, skipped_steps, skipped_steps_total, tokenizer)
    except BaseException as error:
        # Whatever stopped the save (a full disk, a signal, a peer's failure), its half-written
        # folder must not stay behind filling the disk; what is published is left as it is.
        shutil.rmtree(tmp, ignore_errors=True)
        cause = os_error_behind(error) or os_error_behind(take_write_failure())
        if cause is None:
            raise
        raise CheckpointError(
            f"cannot save step {step} into {root}: {cause.strerror or cause} "
            f"({cause.filename or tmp}); nothing of step {step} was kept: free space or fix the "
            f"folder's permissions, then resume. {good_checkpoint_hint(root)}") from error
    return final


def _save_into(tmp: Path, final: Path, root: Path, step: int, model_chunks, optimizer,
               scheduler, model_config: LlamaConfig, layout: ParallelLayout,
               train_state: dict[str, Any], keep_last: Optional[int], skipped_steps: int,
               skipped_steps_total: int, tokenizer: Optional[dict] = None) -> None:
    """The steps of save_checkpoint, in the order that keeps ``latest`` on a complete
    checkpoint: tensors, RNG, checksums, engine state and manifest into ``tmp``; then the rename
    to ``final``; only then ``latest``; then pruning."""
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # debris of an interrupted save
        tmp.mkdir(parents=True)
    _barrier()
    dist_checkpointing.save(sharded_state(model_chunks, optimizer), str(tmp))
    _save_rng(tmp)
    # Each rank checksums what it wrote (still in its page cache); the gather is the barrier.
    checksums = {}
    for entries in _all_gather(checksum_own_files(tmp)):
        checksums.update(entries)
    if _rank() == 0:
        state = {
            "step": step,
            "train_state": train_state,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "model_config": dataclasses.asdict(model_config),
            "world_size": layout.world_size,
            "layout": layout.to_dict(),
            "skipped_steps": skipped_steps,
            "skipped_steps_total": skipped_steps_total,
            "tokenizer": tokenizer,
            "manifest": MANIFEST_FILE,
        }
        _write_state(tmp, state)
        write_manifest(tmp, checksums)
        publish_directory(tmp, final)
        _point_latest(root, final.name)
        if keep_last:
            _prune(root, step, keep_last)
    _barrier()


def _save_rng(directory: Path) -> None:
    (directory / "rng").mkdir(exist_ok=True)  # after the tensors: megatron wants an empty folder
    torch.save(rng_state(), directory / "rng" / f"rank{_rank():05d}.pt")


def _write_state(directory: Path, state: dict) -> None:
    (directory / STATE_FILE).write_text(json.dumps(state, indent=1))


def os_error_behind(error: BaseException) -> Optional[OSError]:
    """The OSError behind ``error`` (raised here, chained, or one a megatron/torch writer
    reported for a rank), or None."""
    seen = set()
    pending = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError):
            return current
        pending += [current.__cause__, current.__context__]
        for failure in (getattr(current, "failures", None) or {}).values():
            pending.append(failure[0] if isinstance(failure, tuple) else failure)
        pending += [arg for arg in getattr(current, "args", ()) if isinstance(arg, BaseException)]
    return None


def _skipped(path: Path, field: str) -> Optional[int]:
    """A checkpoint's count of skipped steps (0 if saved before they were counted; None if its
    engine_state.json cannot be read)."""
    try:
        return int(read_checkpoint_state(path).get(field, 0))
    except (CheckpointError, TypeError, ValueError):
        return None


def _newest_with_no_skipped(checkpoints: list[tuple[int, Path]], field: str) -> Optional[Path]:
    return next((path for _, path in reversed(checkpoints) if _skipped(path, field) == 0), None)


def _prune(root: Path, step: int, keep_last: int) -> None:
    """Delete the checkpoints before ``step`` beyond the newest ``keep_last`` (step's included),
    except two a run whose loss went non-finite needs to go back to:

    - the newest saved before any skipped step of the run (skipped_steps_total == 0), and
    - the newest saved with no skipped step since the checkpoint before it (skipped_steps == 0),
      which error messages name (good_checkpoint).

    Why: a skipped step leaves the weights untouched and a save refuses non-finite ones, so the
    checkpoints saved after skipped steps are finite, but the model may have been diverging
    before its loss went non-finite; without this rule keep_last saves later every checkpoint
    from before the first non-finite step is gone. The cost is at most two extra checkpoints of
    disk. Checkpoints after ``step`` (``latest`` was pointed back at an older one) are left for
    the run to overwrite when it reaches them.
    """
    checkpoints = [(s, path) for s, path in published_checkpoints(root) if s <= step]
    keep = {path for _, path in checkpoints[-keep_last:]}
    keep |= {_newest_with_no_skipped(checkpoints, "skipped_steps_total"),
             _newest_with_no_skipped(checkpoints, "skipped_steps")}
    for _, path in checkpoints:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)


def good_checkpoint(root: str | Path, before: Optional[int] = None) -> Optional[Path]:
    """The checkpoint under ``root`` (saved before step ``before``, if given) to go back to: the
    newest whose files are complete (the manifest's sizes; contents are not read) and that was
    saved with no skipped step since the one before it, else the newest complete one; None if
    there is none."""
    complete = []
    for step, path in published_checkpoints(root):
        if before is not None and step >= before:
            continue
        try:
            check_complete(path)
        except CheckpointError:
            continue
        complete.append((step, path))
    if not complete:
        return None
    return _newest_with_no_skipped(complete, "skipped_steps") or complete[-1][1]


def good_checkpoint_hint(root: str | Path) -> str:
    """A sentence naming good_checkpoint(root) and how to resume from it."""
    root = Path(root)
    good = good_checkpoint(root)
    if good is None:
        return f"{root} holds no complete checkpoint to go back to"
    pointer = root / LATEST
    named = pointer.read_text(errors="replace").strip() if pointer.exists() else None
    how = ("resume from it (latest names it)" if named == good.name else
           f"to resume from it, write {good.name} into {pointer}")
    return f"The newest good checkpoint is {good}: {how}"


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
    return read_json_object(state_file, "the checkpoint is damaged (cut short?); use another "
                            "checkpoint, or restore this one from a copy", DamagedCheckpoint)


def saved_model_config(path: str | Path, state: Optional[dict] = None) -> dict:
    """The model_config of checkpoint ``path``'s engine state (``state`` if already read);
    raises DamagedCheckpoint if it is missing or lacks a shape field (fields that older
    checkpoints do not record take their defaults, _SHAPE_DEFAULTS)."""
    path = Path(path)
    state = read_checkpoint_state(path) if state is None else state
    saved = state.get("model_config")
    if isinstance(saved, dict):
        saved = {**_SHAPE_DEFAULTS, **saved}
    missing = ([field for field in SHAPE_FIELDS if field not in saved]
               if isinstance(saved, dict) else None)
    if missing is None or missing:
        what = "no model_config" if missing is None else f"no {', '.join(missing)} in model_config"
        raise DamagedCheckpoint(
            f"{path / STATE_FILE} has {what} (the model's shape, written by every save): the "
            f"checkpoint is damaged; use another checkpoint, or restore this one from a copy")
    return saved


def check_complete(path: str | Path) -> bool:
    """The cheap part of verify_checkpoint: every file the manifest lists is there with its
    saved size and none is unlisted (contents are not read). True if checked, False for a
    checkpoint saved before manifests existed; raises DamagedCheckpoint naming the file."""
    path = Path(path)
    if read_manifest(path) is not None:
        return True
    if read_checkpoint_state(path).get("manifest"):
        raise DamagedCheckpoint(f"{path / MANIFEST_FILE} is missing, but {path / STATE_FILE} "
                                f"says it was written")
    return False


def verify_checkpoint(path: str | Path, tensors=None) -> bool:
    """Check every file of checkpoint ``path`` against its manifest (``tensors``: a predicate on
    tensor keys; then only the blocks holding the tensors it accepts, and every non-tensor file).

    Collective when a process group exists (the files are split over the ranks). True if
    checked, False for a checkpoint saved before manifests existed (nothing to check against);
    raises DamagedCheckpoint naming each damaged file and where.
    """
    if check_against_manifest(path, tensors) is not None:
        return True
    return check_complete(path)


def check_compatible(path: str | Path, model_config: LlamaConfig) -> dict:
    """Raise CheckpointError if checkpoint ``path`` is incomplete (check_complete) or holds
    another model shape (naming each field that differs); returns its engine state."""
    check_complete(path)
    state = read_checkpoint_state(path)
    saved = saved_model_config(path, state)
    mismatches = [f"{field}: checkpoint {saved[field]} vs config {getattr(model_config, field)}"
                  for field in SHAPE_FIELDS if saved[field] != getattr(model_config, field)]
    if mismatches:
        raise CheckpointError(
            f"checkpoint {path} holds a different model shape ({'; '.join(mismatches)}): load it "
            f"with the model config it was trained with")
    saved_scaling = saved.get("rope_scaling")
    if saved_scaling and model_config.rope_scaling is None:
        # Dropping the scaling changes every long-wavelength frequency the weights learned;
        # continuing with plain RoPE is a choice made at import (--rope-base), not by omission.
        raise CheckpointError(
            f"checkpoint {path} uses RoPE with {saved_scaling.get('rope_type')} scaling "
            f"{saved_scaling}, the config plain RoPE: keep it with model.overrides.rope_scaling "
            f"set to that mapping, or import the Hugging Face model again with --rope-base to "
            f"continue with plain RoPE at a new base")
    return state


def load_checkpoint(path: str | Path, model_chunks, optimizer=None, scheduler=None,
                    model_config: Optional[LlamaConfig] = None,
                    layout: Optional[ParallelLayout] = None) -> dict:
    """Load a checkpoint into this rank's model (and optimizer and scheduler if given).

    The saving layout may differ from the current one. Each rank's RNG states are restored only
    when ``layout`` is given and its sizes equal the saving layout's (the same rank then holds the
    same shard; in another layout a rank's saved RNG belongs to another position). Returns the
    saved engine state (step, train_state, ...).

    Collective. Raises DamagedCheckpoint if a file differs from its manifest, if a checkpoint
    saved before manifests cannot be read, or if a loaded tensor holds NaN or Inf (the model and
    optimizer then hold partly loaded values: load another checkpoint into them, or rebuild).
    """
    path = Path(path)
    checked = verify_checkpoint(path)
    if not checked:
        _print0(f"note: {path} has no {MANIFEST_FILE} (saved before checkpoints had one): its "
                f"files cannot be checked, loading them as they are")
    state = check_compatible(path, model_config) if model_config else read_checkpoint_state(path)
    if optimizer is not None and state.get("weights_only"):
        raise CheckpointError(
            f"{path} holds weights only, no optimizer state (e.g. imported from Hugging Face): "
            f"load it with optimizer=None (engine.train: checkpoint.init_load_optimizer: false) "
            f"and start a fresh optimizer")
    sharded = sharded_state(model_chunks, optimizer, is_loading=True)
    try:
        loaded = dist_checkpointing.load(sharded, str(path))
    except Exception as error:  # noqa: BLE001 - any failure to parse unchecked files is damage
        if checked:
            raise  # the files are those saved: not damage, a bug to see in full
        raise DamagedCheckpoint(f"{path} cannot be read ({type(error).__name__}: "
                                f"{str(error)[:300]})") from error
    for chunk, chunk_state in zip(model_chunks, loaded["model"].values()):
        _unwrap(chunk).load_state_dict(chunk_state)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
        untie_adam_steps(optimizer)
    nonfinite = nonfinite_tensors(model_chunks, optimizer)
    if nonfinite:
        raise DamagedCheckpoint(f"{path} holds NaN or Inf in {_listing(nonfinite)}")
    if scheduler is not None and state.get("scheduler"):
        scheduler.load_state_dict(state["scheduler"])
    rng_file = path / "rng" / f"rank{_rank():05d}.pt"
    restore_rng = (layout is not None and same_sizes(state.get("layout", {}), layout)
                   and rng_file.exists())
    if restore_rng:
        set_rng_state(torch.load(rng_file, weights_only=False))
    state["rng_restored"] = restore_rng
    return state


_SIZES = ("tensor_parallel", "pipeline_parallel", "context_parallel", "data_parallel",
          "virtual_stages")


def same_sizes(saved_layout: dict, layout: ParallelLayout) -> bool:
    """Whether a checkpoint's saved layout has ``layout``'s parallel sizes (same rank placement)."""
    current = layout.to_dict()
    return all(saved_layout.get(name, 1) == current[name] for name in _SIZES)


def resume_candidates(root: str | Path) -> list[Path]:
    """The checkpoints of run directory ``root`` to resume from, newest first: the one
    ``latest`` names (listed even if missing, so that a resume reports it) and every older
    published one; every published one if there is no ``latest``."""
    root = Path(root)
    published = published_checkpoints(root)
    pointer = root / LATEST
    if not pointer.exists():
        return [path for _, path in reversed(published)]
    named = pointer.read_text(errors="replace").strip()
    match = _STEP_NAME.fullmatch(named)
    if match is None:
        raise CheckpointError(f"{pointer} names {named[:80]!r}, not a step_* checkpoint: write "
                              f"the name of one into it"
                              f"{f' (the newest is {published[-1][1].name})' if published else ''}")
    return [root / named] + [path for step, path in reversed(published)
                             if step < int(match.group(1))]


def _set_aside(path: Path) -> Path:
    """Rename damaged checkpoint ``path`` to damaged_NAME (-2, -3... if taken): kept for a
    look, never again a resume candidate, never pruned or overwritten by a later save."""
    target = path.with_name(DAMAGED_PREFIX + path.name)
    copy = 1
    while target.exists():
        copy += 1
        target = path.with_name(f"{DAMAGED_PREFIX}{path.name}-{copy}")
    os.replace(path, target)
    return target


def load_newest_intact(root: str | Path, model_chunks, optimizer, scheduler,
                       model_config: LlamaConfig, layout: ParallelLayout
                       ) -> Optional[tuple[Path, dict]]:
    """Resume a run: load the newest intact checkpoint of ``root`` (see load_checkpoint).

    Collective. Returns (its directory, its engine state), or None if ``root`` holds none yet.
    A damaged checkpoint is skipped with a message naming the file; once an older one has
    loaded, the skipped ones are set aside as damaged_step_* and ``latest`` names the loaded
    one. Raises CheckpointError naming every damaged checkpoint if none is intact.
    """
    root = Path(root)
    damaged = []
    for path in resume_candidates(root):
        try:
            state = load_checkpoint(path, model_chunks, optimizer, scheduler, model_config,
                                    layout=layout)
        except DamagedCheckpoint as error:
            _print0(f"warning: cannot resume from {path}: {error}")
            damaged.append((path, error))
            continue
        if damaged and _rank() == 0:
            for bad, _ in damaged:
                if bad.exists():
                    print(f"set {bad.name} aside as {_set_aside(bad).name} (kept, not used)",
                          flush=True)
            _point_latest(root, path.name)
        _barrier()
        if damaged:
            _print0(f"resuming from {path}, the newest intact checkpoint, instead of "
                    f"{', '.join(bad.name for bad, _ in damaged)}")
        return path, state
    if damaged:
        raise CheckpointError(
            f"no intact checkpoint in {root} to resume from: "
            + " | ".join(f"{bad.name}: {error}" for bad, error in damaged)
            + f". Restore them from a copy, or move them out of {root} to start afresh")
    return None


def resolve_checkpoint(checkpoint: str | Path, step: Optional[int] = None) -> Path:
    """A step directory from a checkpoint root (newest, or ``step``) or a step directory."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if step is not None:
        candidate = path / f"step_{step:08d}"
        if not (candidate / STATE_FILE).exists():
            steps = sorted(p.name for p in path.glob("step_*"))
            raise CheckpointError(f"{candidate}: no complete checkpoint for step {step} "
                                  f"(found: {', '.join(steps) or 'none'})")
        return candidate
    if (path / STATE_FILE).exists():
        return path
    try:
        latest = latest_checkpoint(path)
    except RuntimeError as error:
        raise CheckpointError(str(error)) from None
    if latest is None:
        raise CheckpointError(f"{path}: neither a checkpoint ({STATE_FILE}) nor a checkpoint "
                              f"root with a 'latest' pointer; pass a step_* directory or --step")
    return latest


def model_config_from_state(state: dict, source: Path) -> LlamaConfig:
    known = {f.name for f in dataclasses.fields(LlamaConfig)}
    saved = saved_model_config(source, state)
    try:
        return LlamaConfig(**{k: v for k, v in saved.items() if k in known})
    except TypeError as error:
        raise CheckpointError(f"{source}: model_config is incomplete ({error})") from None
