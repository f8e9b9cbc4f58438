"""Engine checkpoint (any TP/PP/CP/DP layout) -> Hugging Face Llama folder, streamed.

Weights are read from the megatron dist checkpoint one layer of one tensor at a time, converted
and appended to the open safetensors shard, so peak memory is about one layer's weights whatever
the model size. The folder is built under ``.OUT.tmp-export`` and renamed when complete.

The blocks holding the weights are checked against the checkpoint's manifest first (not the
optimizer state: export does not read it), and a weight holding NaN or Inf stops the export.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from engine.checkpoint import (
    CheckpointError,
    good_checkpoint,
    model_config_from_state,
    read_checkpoint_state,
    resolve_checkpoint,
    verify_checkpoint,
)
from engine.convert.dist_checkpoint import DistCheckpointReader
from engine.convert.hf_mapping import (
    LLAMA3_BOS_ID,
    LLAMA3_EOS_ID,
    ConversionError,
    checkpoint_key,
    detect_norm_layout,
    hf_config_from_llama,
    read_json_object,
    weight_mappings,
)
from engine.convert.safetensors_io import ShardedSafetensorsWriter, parse_size
from engine.convert.staging import DTYPES, check_new_folder, peak_rss_bytes, staged_folder
from engine.model.config import LlamaConfig

# Files of a Hugging Face tokenizer folder; nothing else is copied from --tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")


@dataclass
class ExportResult:
    out: Path
    checkpoint: Path
    num_shards: int
    total_bytes: int
    peak_rss_bytes: int


def _token_id(tokenizer_dir: Path, token) -> Optional[int]:
    """The id of a special token named in tokenizer_config.json, if the folder says."""
    if isinstance(token, dict):
        token = token.get("content")
    if token is None:
        return None
    config = _tokenizer_json(tokenizer_dir / "tokenizer_config.json")
    try:
        for token_id, entry in config.get("added_tokens_decoder", {}).items():
            if entry.get("content") == token:
                return int(token_id)
        tokenizer_json = tokenizer_dir / "tokenizer.json"
        if tokenizer_json.exists():
            for entry in _tokenizer_json(tokenizer_json).get("added_tokens", []):
                if entry.get("content") == token:
                    return int(entry["id"])
    except (AttributeError, TypeError, ValueError, KeyError):
        raise ConversionError(f"--tokenizer {tokenizer_dir}: the added tokens of "
                              f"tokenizer_config.json or tokenizer.json are not the mappings a "
                              f"Hugging Face tokenizer writes; re-save the tokenizer") from None
    return None


def _tokenizer_json(path: Path) -> dict:
    return read_json_object(path, "re-save the tokenizer with save_pretrained or pass another "
                                  "--tokenizer")


def special_token_ids(tokenizer_dir: Optional[Path], hf_state: dict, vocab_size: int) -> tuple:
    """(bos, eos): from the tokenizer if given, else from the imported config, else Llama-3's
    (None where Llama-3's id does not fit a smaller test vocabulary)."""
    imported = hf_state.get("config", {})
    bos = imported.get("bos_token_id", LLAMA3_BOS_ID if LLAMA3_BOS_ID < vocab_size else None)
    eos = imported.get("eos_token_id", LLAMA3_EOS_ID if LLAMA3_EOS_ID < vocab_size else None)
    if tokenizer_dir is not None and (tokenizer_dir / "tokenizer_config.json").exists():
        config = _tokenizer_json(tokenizer_dir / "tokenizer_config.json")
        bos = _token_id(tokenizer_dir, config.get("bos_token")) or bos
        eos = _token_id(tokenizer_dir, config.get("eos_token")) or eos
    return bos, eos


def generation_config(imported: Optional[dict], bos, eos) -> dict:
    """The imported model's generation settings with this export's bos/eos ids.

    An imported eos list that already holds ``eos`` is kept: Llama-3-Instruct stops at
    <|end_of_text|> or <|eot_id|> (128001, 128009).
    """
    generation = dict(imported or {})
    generation["bos_token_id"] = bos
    stops = generation.get("eos_token_id")
    if not (isinstance(stops, list) and eos in stops):
        generation["eos_token_id"] = eos
    return generation


def _tokenizer_files(tokenizer_dir: Path) -> list[Path]:
    if not tokenizer_dir.is_dir():
        raise ConversionError(f"--tokenizer {tokenizer_dir}: no such directory")
    found = [tokenizer_dir / name for name in TOKENIZER_FILES if (tokenizer_dir / name).is_file()]
    if not found:
        raise ConversionError(f"--tokenizer {tokenizer_dir}: holds none of "
                              f"{', '.join(TOKENIZER_FILES)}; point it at a tokenizer folder")
    return found


def export_checkpoint(checkpoint: str | Path, out: str | Path, step: Optional[int] = None,
                      tokenizer: Optional[str | Path] = None, dtype: str = "bfloat16",
                      max_shard_size: str = "5GB", log=print) -> ExportResult:
    """Write the Hugging Face folder ``out`` from an engine checkpoint. See module docstring."""
    source = resolve_checkpoint(checkpoint, step)
    try:
        if not verify_checkpoint(source, tensors=_is_weight):
            log(f"note: {source} has no manifest.json (saved before checkpoints had one): its "
                f"files cannot be checked, exporting them as they are")
        state = read_checkpoint_state(source)
    except CheckpointError as error:
        raise ConversionError(f"{error}{_another_checkpoint(source)}") from None
    config = model_config_from_state(state, source)
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r} must be one of {sorted(DTYPES)}")
    tokenizer_dir = Path(tokenizer) if tokenizer else None
    tokenizer_files = _tokenizer_files(tokenizer_dir) if tokenizer_dir else []
    out = Path(out)
    check_new_folder(out)
    hf_state = state.get("hugging_face") or {}
    bos, eos = special_token_ids(tokenizer_dir, hf_state, config.vocab_size)

    reader = DistCheckpointReader(source)
    mappings = weight_mappings(config, detect_norm_layout(reader.tensors))
    _check_checkpoint_shapes(reader, mappings, config, source)

    with staged_folder(out, "export") as tmp:
        writer = ShardedSafetensorsWriter(
            tmp, [(name, shape) for m in mappings for name, shape in zip(m.hf_names, m.hf_shapes)],
            DTYPES[dtype], parse_size(max_shard_size))
        for layer_mappings in _group_by_layer(mappings):
            tensors = reader.read_layers([checkpoint_key(m.engine_name) for m in layer_mappings])
            for mapping, tensor in zip(layer_mappings, tensors):
                _check_finite(tensor, mapping, source)
                for name, hf_tensor in zip(mapping.hf_names, mapping.to_hf(tensor, config)):
                    writer.write(name, hf_tensor)
            del tensors
        writer.finish()
        hf_config = hf_config_from_llama(config, DTYPES[dtype], bos, eos)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        generation = generation_config(hf_state.get("generation_config"), bos, eos)
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        for path in tokenizer_files:
            shutil.copyfile(path, tmp / path.name)
        (tmp / "engine_export.json").write_text(json.dumps(
            {"checkpoint": str(source.resolve()), "step": state.get("step"),
             "saved_layout": state.get("layout")}, indent=1) + "\n")
    result = ExportResult(out, source, len(writer.shards), writer.total_bytes, peak_rss_bytes())
    log(f"exported {source} (step {state.get('step')}) -> {out}: {result.num_shards} shard(s), "
        f"{result.total_bytes / 1e6:.1f} MB {dtype}; peak RSS {result.peak_rss_bytes / 2**20:.0f} MiB")
    return result


def _is_weight(key: str) -> bool:
    """Whether a dist checkpoint key is the model's (export reads no optimizer state)."""
    return not key.startswith("optimizer.")


def _check_finite(tensor: torch.Tensor, mapping, source: Path) -> None:
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        key, layer = checkpoint_key(mapping.engine_name)
        raise ConversionError(
            f"{source}: tensor {key}{'' if layer is None else f' (layer {layer})'} holds {bad} "
            f"NaN or Inf values of {tensor.numel()}; refusing to export non-finite weights"
            f"{_another_checkpoint(source)}")


def _another_checkpoint(source: Path) -> str:
    """'; the newest good checkpoint before it is X' when ``source`` is a step of a run."""
    match = re.fullmatch(r"step_(\d+)", source.name)
    good = good_checkpoint(source.parent, before=int(match.group(1))) if match else None
    return f"; the newest good checkpoint before it is {good}" if good is not None else ""


def _group_by_layer(mappings):
    """Mappings in order, grouped so that one read serves a whole layer (or one global tensor)."""
    group, current = [], object()
    for mapping in mappings:
        _, layer = checkpoint_key(mapping.engine_name)
        if group and (layer != current or layer is None):
            yield group
            group = []
        group.append(mapping)
        current = layer
    if group:
        yield group


def _check_checkpoint_shapes(reader: DistCheckpointReader, mappings, config: LlamaConfig,
                             source: Path) -> None:
    """Every tensor the model needs is in the checkpoint with the shape its config implies."""
    for mapping in mappings:
        key, layer = checkpoint_key(mapping.engine_name)
        if key not in reader.tensors:
            raise ConversionError(f"{source}: tensor {key} is missing; the checkpoint is not a "
                                  f"complete engine Llama checkpoint")
        stored = tuple(reader.shape(key))
        if layer is not None:
            expected = (config.num_layers, *mapping.engine_shape(stored[1]))
        else:
            expected = mapping.engine_shape(stored[0])
        vocab_ok = not mapping.vocab_rows or stored[0] >= config.vocab_size
        if stored != expected or not vocab_ok:
            raise ConversionError(
                f"{source}: tensor {key} has shape {stored}, but engine_state.json's model_config "
                f"implies {expected}; the checkpoint and its engine_state.json disagree")
