"""Hugging Face weight folders: stream safetensors shards out, read them back tensor by tensor.

The writer plans every shard from names and shapes first, so each file's header is known before
its first tensor arrives and tensors are written as they are converted: memory holds one tensor,
not one shard. Format (safetensors spec): u64 little-endian header length, JSON header
{name: {dtype, shape, data_offsets}} padded with spaces to 8 bytes, then the raw little-endian
tensor bytes in header order.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from engine.convert.hf_mapping import ConversionError, read_json_object

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_DTYPE_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '2GiB' / '1000' -> bytes (decimal units like Hugging Face's)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    stripped = text.strip().upper()
    number = stripped.rstrip("KMGTIB")
    unit = stripped[len(number):]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise ConversionError(f"size {text!r} is not a number with a unit like 5GB or 500MB") from None
    if value <= 0:
        raise ConversionError(f"size {text!r} must be positive")
    return int(value)


@dataclass
class _PlannedShard:
    file_name: str
    names: list[str]
    header: bytes
    data_bytes: int


class ShardedSafetensorsWriter:
    """Writes tensors, in the planned order, into ``model-0000x-of-0000y.safetensors`` files."""

    def __init__(self, directory: Path, tensors: list[tuple[str, tuple[int, ...]]],
                 dtype: torch.dtype, max_shard_bytes: int):
        if dtype not in _DTYPE_CODES:
            raise ConversionError(f"dtype {dtype} cannot be exported; use one of "
                                  f"{[str(d).removeprefix('torch.') for d in _DTYPE_CODES]}")
        self.directory, self.dtype = Path(directory), dtype
        self._shapes = {name: tuple(shape) for name, shape in tensors}
        element = torch.empty((), dtype=dtype).element_size()
        groups: list[list[tuple[str, tuple[int, ...], int]]] = [[]]
        filled = 0
        for name, shape in tensors:
            size = math.prod(shape) * element
            # A tensor larger than the limit gets a shard of its own (as Hugging Face does).
            if groups[-1] and filled + size > max_shard_bytes:
                groups.append([])
                filled = 0
            groups[-1].append((name, tuple(shape), size))
            filled += size
        self.shards: list[_PlannedShard] = []
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        for number, group in enumerate(groups, start=1):
            file_name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for name, shape, size in group:
                header[name] = {"dtype": _DTYPE_CODES[dtype], "shape": list(shape),
                                "data_offsets": [offset, offset + size]}
                offset += size
                self.weight_map[name] = file_name
            encoded = json.dumps(header, separators=(",", ":")).encode()
            encoded += b" " * (-len(encoded) % 8)
            self.shards.append(_PlannedShard(file_name, [n for n, _, _ in group], encoded, offset))
            self.total_bytes += offset
        self._order = [name for shard in self.shards for name in shard.names]
        self._shard_of = {name: i for i, shard in enumerate(self.shards) for name in shard.names}
        self._next = 0
        self._shard_index = -1
        self._file = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor (cast to the export dtype)."""
        if self._next >= len(self._order) or self._order[self._next] != name:
            expected = self._order[self._next] if self._next < len(self._order) else "nothing"
            raise AssertionError(f"safetensors writer: got {name}, planned {expected}")
        shard_index = self._shard_of[name]
        if shard_index != self._shard_index:
            self._open(shard_index)
        data = tensor.detach().to(self.dtype).contiguous()
        if tuple(data.shape) != self._shapes[name]:
            raise AssertionError(f"{name}: shape {tuple(data.shape)}, planned {self._shapes[name]}")
        # The array's buffer is written directly: no bytes copy of a large tensor.
        self._file.write(data.view(torch.uint8).reshape(-1).numpy())
        self._next += 1

    def _open(self, shard_index: int) -> None:
        self._close()
        shard = self.shards[shard_index]
        self._file = open(self.directory / shard.file_name, "wb")
        self._file.write(struct.pack("<Q", len(shard.header)))
        self._file.write(shard.header)
        self._shard_index = shard_index

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self) -> None:
        """Close the last shard and write the index; every planned tensor must be written."""
        self._close()
        if self._next != len(self._order):
            raise AssertionError(f"safetensors writer: {len(self._order) - self._next} planned "
                                 f"tensors never written, first {self._order[self._next]}")
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


class HFWeightReader:
    """The tensors of a Hugging Face folder (one model.safetensors or an index and shards).

    Construction checks that every file the index names exists and reads each file's header;
    tensors are then read one at a time (memory-mapped), never a whole shard.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index_path, single = self.folder / INDEX_FILE, self.folder / SINGLE_FILE
        if index_path.exists():
            fix = "re-save the model with save_pretrained or re-download the folder"
            weight_map = read_json_object(index_path, fix).get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                    isinstance(name, str) for name in weight_map.values()):
                raise ConversionError(f"{index_path}: weight_map is {str(weight_map)[:80]!r}, not "
                                      f"a mapping of tensor names to shard files; {fix}")
            files = sorted(set(weight_map.values()))
        elif single.exists():
            weight_map, files = None, [SINGLE_FILE]
        else:
            bins = sorted(p.name for p in self.folder.glob("*.bin"))
            hint = (f" (found {bins[0]}...: PyTorch .bin weights; re-save with "
                    f"save_pretrained(safe_serialization=True))" if bins else "")
            raise ConversionError(f"{self.folder}: no {INDEX_FILE} or {SINGLE_FILE}{hint}")
        missing = [name for name in files if not (self.folder / name).is_file()]
        if missing:
            raise ConversionError(
                f"{self.folder / missing[0]}: shard named in {INDEX_FILE} is missing"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + "; download the complete model folder")
        self._location: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name in files:
            try:
                with safe_open(str(self.folder / name), framework="pt") as handle:
                    for key in handle.keys():
                        self._location[key] = name
                        self.shapes[key] = tuple(handle.get_slice(key).get_shape())
            except Exception as error:  # safetensors raises its own error types
                raise ConversionError(f"{self.folder / name}: unreadable safetensors file "
                                      f"({error}); re-download it") from None
        if weight_map is not None:
            for key, name in weight_map.items():
                if self._location.get(key) != name:
                    raise ConversionError(f"{self.folder / name}: the index says it holds {key}, "
                                          f"but it does not; the folder is inconsistent")

    def get(self, name: str) -> torch.Tensor:
        """One tensor, copied out of its memory-mapped file; the mapping is closed again so the
        pages it touched do not stay resident for the rest of the conversion."""
        with safe_open(str(self.folder / self._location[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    def file_of(self, name: str) -> Optional[str]:
        return self._location.get(name)

    def close(self) -> None:
        pass  # no file stays open between reads
