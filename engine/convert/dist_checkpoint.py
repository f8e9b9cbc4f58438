"""Read and write megatron-core dist checkpoints one tensor region at a time, in one process.

A megatron "torch_dist" checkpoint is a torch.distributed.checkpoint directory (``.metadata`` plus
``__R_F.distcp`` files) with megatron's ``metadata.json`` and ``common.pt`` beside it. Tensors are
stored by global key and offset whatever layout saved them; per-layer weights are stacked along a
leading layer dimension. The planners below use torch's public planner interfaces so that only
the requested region (one layer of one key) is ever in memory.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

# What megatron's dist_checkpointing.save writes beside the torch files (megatron-core 0.16).
MEGATRON_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                     "common_backend": "torch", "common_backend_version": 1}
MEGATRON_COMMON_FILE = "common.pt"


def _narrow(tensor: torch.Tensor, offsets, lengths) -> torch.Tensor:
    for dim, (start, length) in enumerate(zip(offsets, lengths)):
        tensor = tensor.narrow(dim, start, length)
    return tensor


class _RegionLoadPlanner(LoadPlanner):
    """Reads requested regions (key, offsets, sizes) into caller-owned tensors."""

    def __init__(self, regions: dict[str, tuple[ChunkStorageMetadata, torch.Tensor]]):
        self.regions = regions

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False, **_):
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, (chunk, _) in self.regions.items():
            items += create_read_items_for_chunk_list(
                key, self.metadata.state_dict_metadata[key], [chunk])
        return LoadPlan(items)

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value):
        raise AssertionError(f"unexpected bytes read for {read_item.dest_index.fqn}")

    def resolve_tensor(self, read_item):
        _, destination = self.regions[read_item.dest_index.fqn]
        return _narrow(destination, read_item.dest_offsets, read_item.lengths)

    def commit_tensor(self, read_item, tensor):
        pass  # resolve_tensor returned a view of the destination: already in place


class DistCheckpointReader:
    """Tensor regions of one megatron dist checkpoint directory, loaded on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._reader = dcp.FileSystemReader(str(self.path))
        self.metadata = self._reader.read_metadata()
        self.tensors: dict[str, TensorStorageMetadata] = {
            key: md for key, md in self.metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata)}

    def shape(self, key: str) -> torch.Size:
        return self.tensors[key].size

    def read_layers(self, requests: list[tuple[str, Optional[int]]]) -> list[torch.Tensor]:
        """For each (key, layer): the whole tensor (layer None) or one layer of a stacked one.

        All requests are served by one pass over the files they live in.
        """
        regions, results = {}, []
        for key, layer in requests:
            md = self.tensors[key]
            if layer is None:
                offsets, sizes = [0] * len(md.size), list(md.size)
            else:
                offsets, sizes = [layer] + [0] * (len(md.size) - 1), [1, *md.size[1:]]
            destination = torch.empty(sizes, dtype=md.properties.dtype)
            regions[key] = (ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)),
                            destination)
            results.append(destination if layer is None else destination[0])
        if len({key for key, _ in requests}) != len(requests):
            raise ValueError("read_layers: one region per key per call")
        dcp.load({}, storage_reader=self._reader, planner=_RegionLoadPlanner(regions),
                 no_dist=True)
        return results


class _StreamingSavePlanner(SavePlanner):
    """Writes items whose data is produced on demand, one at a time, by ``producers``."""

    def __init__(self, items: list[tuple[WriteItem, Callable[[], object]]]):
        self.items = items
        self.producers = {(item.index.fqn, item.index.offset): produce for item, produce in items}

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False, **_):
        pass

    def create_local_plan(self) -> SavePlan:
        return SavePlan([item for item, _ in self.items])

    def create_global_plan(self, all_plans):
        return create_default_global_save_plan(all_plans)

    def finish_plan(self, new_plan):
        return new_plan

    def resolve_data(self, write_item):
        return self.producers[(write_item.index.fqn, write_item.index.offset)]()


class DistCheckpointWriter:
    """Collects tensor chunks and opaque objects, then writes them as a megatron checkpoint."""

    def __init__(self):
        self._items: list[tuple[WriteItem, Callable[[], object]]] = []

    def add_layer(self, key: str, stacked_shape, dtype: torch.dtype, layer: int,
                  produce: Callable[[], torch.Tensor]) -> None:
        """Layer ``layer`` of stacked tensor ``key`` [layers, ...]; produce() returns [...]."""
        offsets = torch.Size([layer] + [0] * (len(stacked_shape) - 1))
        sizes = torch.Size([1, *stacked_shape[1:]])
        self._add_tensor_item(key, torch.Size(stacked_shape), dtype, offsets, sizes,
                              lambda: produce().unsqueeze(0))

    def add_tensor(self, key: str, shape, dtype: torch.dtype,
                   produce: Callable[[], torch.Tensor]) -> None:
        shape = torch.Size(shape)
        self._add_tensor_item(key, shape, dtype, torch.Size([0] * len(shape)), shape, produce)

    def _add_tensor_item(self, key, global_shape, dtype, offsets, sizes, produce) -> None:
        item = WriteItem(
            index=MetadataIndex(key, offsets),
            type=WriteItemType.SHARD,
            tensor_data=TensorWriteData(
                chunk=ChunkStorageMetadata(offsets=offsets, sizes=sizes),
                properties=TensorProperties(dtype=dtype),
                size=global_shape,
            ),
        )

        def checked():
            tensor = produce().to(dtype).contiguous()
            if tensor.shape != sizes:
                raise AssertionError(f"{key} at {tuple(offsets)}: produced {tuple(tensor.shape)}"
                                     f", planned {tuple(sizes)}")
            return tensor

        self._items.append((item, checked))

    def add_object(self, key: str, value) -> None:
        """An opaque object stored the way megatron stores a ShardedObject (a torch-saved list)."""
        def produce():
            buffer = io.BytesIO()
            torch.save([value], buffer)
            buffer.seek(0)
            return buffer

        self._items.append((WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO),
                            produce))

    def write(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # One file, one thread: items are produced and written one at a time.
        writer = dcp.FileSystemWriter(str(directory), single_file_per_rank=True, thread_count=1)
        dcp.save({}, storage_writer=writer, planner=_StreamingSavePlanner(self._items),
                 no_dist=True)
        (directory / "metadata.json").write_text(json.dumps(MEGATRON_METADATA))
        torch.save({}, directory / MEGATRON_COMMON_FILE)
