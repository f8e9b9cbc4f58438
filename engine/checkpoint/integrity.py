"""Checkpoint integrity: a checksum manifest written into every checkpoint before it is
published and checked before it is used, and a scan for non-finite weights and optimizer state.

    step_00000100/manifest.json
        {"format": 1, "algorithm": "crc32", "block_bytes": 8388608,
         "files": {"__0_0.distcp": {"bytes": 883678, "crc32": [2793361702]}, ...}}

Every file of the step directory except the manifest is listed with its size and the CRC-32
(zlib) of each 8 MiB block. CRC-32 catches accidental damage (a bad disk block, a cut or partial
copy, an overwritten range) at ~4 GB/s per core, several times faster than a cryptographic hash;
it does not resist deliberate tampering, which is not the threat here. Blocks, not one sum per
file, let a reader of part of a file check only what it reads: export reads the weights, not the
optimizer state beside them in the same files.

At save each rank checksums the files it wrote, while they are still in its page cache, so the
cost is spread over the ranks like the writing itself; rank 0 adds the rest and writes the
manifest. At load the files are split over the ranks by size.
"""
from __future__ import annotations

import json
import math
import os
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader

from engine.checkpoint.errors import DamagedCheckpoint
from publishing.atomic import write_text_atomically

MANIFEST_FILE = "manifest.json"
BLOCK_BYTES = 8 << 20
# A block is read into memory whole to be checked: a manifest asking for more than this is
# damaged (this engine writes BLOCK_BYTES), not a reason to allocate terabytes.
MAX_BLOCK_BYTES = 1 << 30
# Threads per rank checksumming blocks of one file (pread and zlib.crc32 release the GIL): a
# rank's share of a large checkpoint is checked at a few times one core's ~4 GB/s.
HASH_THREADS = 4
_FORMAT = 1
# megatron's torch_dist backend names tensor files __RANK_N.distcp; the engine writes
# rng/rankRANK.pt. Every other file (.metadata, common.pt, metadata.json, engine_state.json)
# is rank 0's.
_WRITER_PATTERNS = (re.compile(r"__(\d+)_\d+\.distcp"), re.compile(r"rng/rank(\d+)\.pt"))
# With a tensor predicate only the blocks of tensor files holding those tensors are checked; every
# other file (where the tensors are, the engine state, RNG) is checked whole.
_TENSOR_FILE_SUFFIX = ".distcp"


def _rank_and_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _files(directory: Path) -> list[str]:
    """Every file under ``directory`` except the manifest, as sorted relative POSIX paths."""
    found = [path.relative_to(directory).as_posix() for path in directory.rglob("*")
             if path.is_file()]
    return sorted(name for name in found if name != MANIFEST_FILE)


def _block_checksums(path: Path, block_bytes: int,
                     blocks: Optional[Iterable[int]] = None) -> dict[int, int]:
    """{block index: CRC-32} of the ``block_bytes`` blocks of ``path`` (all, or ``blocks``)."""
    if blocks is None:
        blocks = range(math.ceil(path.stat().st_size / block_bytes))
    blocks = sorted(blocks)
    descriptor = os.open(path, os.O_RDONLY)
    try:
        def checksum(index: int) -> tuple[int, int]:
            return index, zlib.crc32(os.pread(descriptor, block_bytes, index * block_bytes))

        if len(blocks) < 2:
            return dict(map(checksum, blocks))
        with ThreadPoolExecutor(HASH_THREADS) as pool:
            return dict(pool.map(checksum, blocks))
    finally:
        os.close(descriptor)


def _entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size,
            "crc32": list(_block_checksums(path, BLOCK_BYTES).values())}


def written_by(name: str) -> int:
    """The rank that wrote file ``name`` (relative to the step directory) of a checkpoint."""
    for pattern in _WRITER_PATTERNS:
        match = pattern.fullmatch(name)
        if match:
            return int(match.group(1))
    return 0


def checksum_own_files(directory: str | Path) -> dict[str, dict]:
    """Manifest entries for the files of ``directory`` that this rank wrote (see written_by)."""
    directory = Path(directory)
    rank, _ = _rank_and_world()
    return {name: _entry(directory / name) for name in _files(directory)
            if written_by(name) == rank}


def write_manifest(directory: str | Path, entries: Optional[dict[str, dict]] = None) -> Path:
    """Write ``directory``/manifest.json from ``entries`` (checksums other ranks computed)
    completed with every file they lack; written under a temporary name, then renamed."""
    directory = Path(directory)
    entries = dict(entries or {})
    files = {name: entries.get(name) or _entry(directory / name) for name in _files(directory)}
    header = json.dumps({"format": _FORMAT, "algorithm": "crc32", "block_bytes": BLOCK_BYTES})
    listing = ",\n".join(f" {json.dumps(name)}: {json.dumps(entry)}"
                         for name, entry in files.items())
    path = directory / MANIFEST_FILE
    write_text_atomically(path, f'{header[:-1]}, "files": {{\n{listing}\n}}}}\n')  # a file a line
    return path


def read_manifest(directory: str | Path) -> Optional[dict]:
    """The manifest of checkpoint ``directory`` after the cheap checks (every listed file is
    there with its saved size, no file is unlisted); None if it has none (saved before
    manifests existed, or the manifest was lost: the caller tells which). Raises
    DamagedCheckpoint naming the file otherwise."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DamagedCheckpoint(f"{directory}: no such checkpoint directory")
    path = directory / MANIFEST_FILE
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if not (isinstance(manifest["block_bytes"], int)
                and 0 < manifest["block_bytes"] <= MAX_BLOCK_BYTES
                and manifest["algorithm"] == "crc32"):
            raise ValueError(f"block_bytes {manifest['block_bytes']!r}, algorithm "
                             f"{manifest['algorithm']!r}: not what this engine writes")
        sizes = {name: int(entry["bytes"]) for name, entry in files.items()}
        for name, entry in files.items():
            if len(entry["crc32"]) != math.ceil(sizes[name] / manifest["block_bytes"]):
                raise ValueError(f"{name}: {len(entry['crc32'])} checksums for "
                                 f"{sizes[name]} bytes")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise DamagedCheckpoint(f"{path} is not a complete manifest ({error}); the checkpoint "
                                f"cannot be checked") from None
    problems = []
    for name, size in sizes.items():
        file = directory / name
        if not file.is_file():
            problems.append(f"{file} is missing")
        elif file.stat().st_size != size:
            actual = file.stat().st_size
            problems.append(f"{file} has {actual} bytes, {size} were saved"
                            f"{' (cut short)' if actual < size else ''}")
    problems += [f"{directory / name} is not listed in {MANIFEST_FILE} (written after the save?)"
                 for name in _files(directory) if name not in files]
    if problems:
        raise DamagedCheckpoint("; ".join(problems))
    return manifest


def _blocks_of_tensors(directory: Path, tensors: Callable[[str], bool],
                       block_bytes: int) -> dict[str, set[int]]:
    """{tensor file: indices of the blocks holding any part of a tensor whose key ``tensors``
    accepts}."""
    metadata = FileSystemReader(str(directory)).read_metadata()
    blocks: dict[str, set[int]] = {}
    for index, stored in metadata.storage_data.items():
        if tensors(index.fqn):
            first = stored.offset // block_bytes
            last = (stored.offset + max(stored.length, 1) - 1) // block_bytes
            blocks.setdefault(stored.relative_path, set()).update(range(first, last + 1))
    return blocks


def _check_blocks(directory: Path, manifest: dict,
                  jobs: dict[str, Optional[set[int]]]) -> list[str]:
    """Problems found checking the blocks of ``jobs`` ({file: blocks, None = all})."""
    problems, block_bytes = [], manifest["block_bytes"]
    for name, blocks in jobs.items():
        saved = manifest["files"][name]["crc32"]
        actual = _block_checksums(directory / name, block_bytes, blocks)
        bad = [index for index, crc in actual.items() if crc != saved[index]]
        if not bad:
            continue
        size = manifest["files"][name]["bytes"]
        more = f", and {len(bad) - 1} more" if len(bad) > 1 else ""
        where = ("its contents" if len(saved) == 1 else
                 f"bytes {bad[0] * block_bytes}-{min((bad[0] + 1) * block_bytes, size) - 1} "
                 f"(block {bad[0]} of {len(saved)}{more})")
        problems.append(f"{directory / name}: {where} differ from what was saved (checksum "
                        f"mismatch)")
    return problems


def _split_by_size(jobs: dict[str, Optional[set[int]]], manifest: dict,
                   world_size: int) -> list[dict]:
    """``jobs`` over ``world_size`` ranks, largest first onto the least loaded (every rank
    computes the same split from the same manifest)."""
    def cost(name):
        blocks = jobs[name]
        if blocks is None:
            return manifest["files"][name]["bytes"]
        return len(blocks) * manifest["block_bytes"]
    shares, loads = [{} for _ in range(world_size)], [0] * world_size
    for name in sorted(jobs, key=lambda n: (-cost(n), n)):
        rank = loads.index(min(loads))
        shares[rank][name] = jobs[name]
        loads[rank] += cost(name)
    return shares


def check_against_manifest(directory: str | Path,
                           tensors: Optional[Callable[[str], bool]] = None) -> Optional[dict]:
    """Check checkpoint ``directory`` against its manifest: every file (or, with ``tensors``, a
    predicate on tensor keys, the non-tensor files in full and only the blocks of tensor files
    holding tensors it accepts).

    Collective when a process group exists: the files are split over the ranks and every rank
    gets the same verdict. Returns the manifest, or None if there is none (nothing to check
    against); raises DamagedCheckpoint naming each damaged file and where.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        return None
    names = list(manifest["files"])
    if tensors is None:
        stages = [{name: None for name in names}]
    else:
        small = {name: None for name in names if not name.endswith(_TENSOR_FILE_SUFFIX)}
        stages = [small,
                  lambda: _blocks_of_tensors(directory, tensors, manifest["block_bytes"])]
    rank, world_size = _rank_and_world()
    for jobs in stages:
        if callable(jobs):  # needs the .metadata the previous stage checked
            jobs = jobs()
        problems = _check_blocks(directory, manifest,
                                 _split_by_size(jobs, manifest, world_size)[rank])
        if world_size > 1:
            gathered = [None] * world_size
            dist.all_gather_object(gathered, problems)
            problems = [problem for share in gathered for problem in share]
        if problems:
            raise DamagedCheckpoint("; ".join(sorted(problems)))
    return manifest


# ---------------------------------------------------------------------------------------------
# Non-finite values
# ---------------------------------------------------------------------------------------------

def _optimizer_tensors(optimizer, model_names: dict[int, str]):
    """(name, tensor) of the fp32 main weights and the state (Adam moments) of ``optimizer``
    (megatron's, possibly chained), named after the model weight they belong to."""
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        owner = {}
        # megatron keeps model weights and their main copies in parallel lists of groups
        # (distributed optimizer: the shards this rank updates; otherwise whole copies).
        for model_attr, main_attr in (("model_float16_groups", "shard_fp32_from_float16_groups"),
                                      ("model_fp32_groups", "shard_fp32_groups"),
                                      ("float16_groups", "fp32_from_float16_groups")):
            for model_group, main_group in zip(getattr(part, model_attr, None) or [],
                                               getattr(part, main_attr, None) or []):
                for model_param, main in zip(model_group, main_group):
                    owner[id(main)] = model_param
        inner = part.optimizer
        for group in inner.param_groups:
            for main in group["params"]:
                model_param = owner.get(id(main), main)
                name = model_names.get(id(model_param), "an unnamed weight")
                if (id(main) not in model_names and main.untyped_storage().data_ptr()
                        != model_param.untyped_storage().data_ptr()):
                    yield f"main weight of {name}", main
                for key, value in inner.state.get(main, {}).items():
                    if torch.is_tensor(value) and value.is_floating_point():
                        yield f"optimizer {key} of {name}", value


def local_nonfinite_tensors(model_chunks, optimizer=None) -> list[str]:
    """This rank's weights and optimizer tensors holding NaN or Inf, each as
    'NAME (K of N values)'."""
    tensors, model_names = [], {}
    for index, chunk in enumerate(model_chunks):
        prefix = f"chunk{index}." if len(model_chunks) > 1 else ""
        for name, param in chunk.named_parameters():
            name = prefix + name.removeprefix("module.")
            model_names[id(param)] = name
            tensors.append((name, param))
    if optimizer is not None:
        tensors += list(_optimizer_tensors(optimizer, model_names))
    # One reduction per tensor and one device sync for all: a sum is non-finite when an element
    # is (or, for absurd magnitudes, when it overflows; the element check below tells which).
    suspects = []
    by_device: dict[torch.device, list[int]] = {}
    for position, (_, tensor) in enumerate(tensors):
        by_device.setdefault(tensor.device, []).append(position)
    for positions in by_device.values():
        sums = torch.stack([tensors[p][1].detach().sum(dtype=torch.float32) for p in positions])
        suspects += [positions[i] for i in (~torch.isfinite(sums)).nonzero().flatten().tolist()]
    found = []
    for position in sorted(suspects):
        name, tensor = tensors[position]
        count = int((~torch.isfinite(tensor.detach())).sum())
        if count:
            found.append(f"{name} ({count} of {tensor.numel()} values)")
    return found


def nonfinite_tensors(model_chunks, optimizer=None) -> list[str]:
    """Every rank's weights and optimizer tensors holding NaN or Inf, each as
    'NAME (K of N values) on rank R' (collective when a process group exists)."""
    rank, world_size = _rank_and_world()
    found = local_nonfinite_tensors(model_chunks, optimizer)
    if world_size == 1:
        return [f"{entry} on rank 0" for entry in found]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, found)
    return [f"{entry} on rank {r}" for r, entries in enumerate(gathered) for entry in entries]
