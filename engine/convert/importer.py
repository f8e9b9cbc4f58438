"""Hugging Face Llama folder -> engine checkpoint that loads into any TP/PP layout, streamed.

The result is a megatron dist checkpoint written from one process: tensors are stored under
their global keys (per-layer weights stacked along a layer dimension), which is what every
layout's ``sharded_state_dict`` asks for, so ``engine.checkpoint.load_checkpoint`` loads it in
TP2 x PP2 as well as TP1. It holds weights only (step 0, no optimizer or scheduler state):
a run starts from it with ``load_checkpoint(path, chunks, optimizer=None, load_rng=False)`` and a
fresh optimizer. Each HF tensor is read (memory-mapped) only when its engine tensor is written.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from data_tools.tokenizer import TokenizerError, load_tokenizer
from engine.checkpoint import LATEST, MANIFEST_FILE, STATE_FILE, write_manifest
from engine.convert.dist_checkpoint import DistCheckpointWriter
from engine.convert.hf_mapping import (
    CHECKPOINT_NORM_LAYOUT,
    ConversionError,
    checked_number,
    checkpoint_key,
    llama_config_from_hf,
    read_json_object,
    rope_scaling_of,
    weight_mappings,
)
from engine.convert.safetensors_io import HFWeightReader
from engine.convert.staging import DTYPES, check_new_folder, peak_rss_bytes, staged_folder
from engine.model.config import LlamaConfig
from engine.parallel.layout import LayoutError, ParallelLayout

# Weights whose values follow from the config (older exports saved RoPE's inverse frequencies).
_DERIVED_HF_TENSORS = (".rotary_emb.inv_freq",)
# Only these LlamaConfig fields may be overridden: the others fix the weights' shapes.
OVERRIDABLE_FIELDS = ("rope_base", "max_position_embeddings", "norm_eps", "init_method_std")
# megatron keeps an opaque per-module "extra state" (fp8 metadata under transformer-engine) for
# each of these; every layout's checkpoint has one entry per layer, None for local modules.
_EXTRA_STATE_MODULES = ("self_attention.linear_proj", "self_attention.linear_qkv",
                        "mlp.linear_fc1", "mlp.linear_fc2")


@dataclass
class ImportResult:
    checkpoint: Path
    model_config: LlamaConfig
    peak_rss_bytes: int


def read_hf_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise ConversionError(f"--hf {folder}: no such directory")
    path = folder / "config.json"
    if not path.is_file():
        raise ConversionError(f"{path}: missing; --hf must be a Hugging Face model folder "
                              f"(config.json and *.safetensors)")
    return read_json_object(path, "re-download it or re-save the model with save_pretrained")


def check_hf_folder(hf: Path, rope_base: Optional[float] = None,
                    untie_embeddings: bool = False) -> LlamaConfig:
    """The LlamaConfig of Hugging Face folder ``hf`` after the checks import makes (config.json,
    every shard the index names, every tensor's presence and shape, tied matrices equal);
    ConversionError naming the file or tensor and the fix otherwise."""
    config = hf_folder_config(hf, read_hf_config(hf), rope_base, untie_embeddings)
    weights = HFWeightReader(hf)
    try:
        _check_hf_tensors(weights, weight_mappings(config, CHECKPOINT_NORM_LAYOUT), hf, config)
    finally:
        weights.close()
    return config


def hf_folder_config(hf: Path, hf_config: dict, rope_base: Optional[float] = None,
                     untie_embeddings: bool = False) -> LlamaConfig:
    """The engine config of folder ``hf`` as import makes it: its own RoPE unless ``rope_base``
    (plain RoPE at that base), its own embedding tie unless ``untie_embeddings``."""
    if rope_base is not None:
        checked_number(rope_base, "--rope-base", "the command line", minimum=1.0, example="8e6")
    config = llama_config_from_hf(hf_config, str(hf / "config.json"), rope_base=rope_base)
    if untie_embeddings and not config.untie_embeddings:
        # Untied on purpose: the output layer starts as a copy of the embedding.
        config = config.replace(untie_embeddings=True)
    return config


def parse_overrides(items: list[str]) -> dict:
    """['rope_base=8e6', 'max_position_embeddings=65536'] -> typed field values."""
    types = {f.name: f.type for f in dataclasses.fields(LlamaConfig)}
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in types:
            raise ConversionError(f"--model-config-overrides {item!r}: expected FIELD=VALUE with "
                                  f"FIELD one of {', '.join(OVERRIDABLE_FIELDS)}")
        if key not in OVERRIDABLE_FIELDS:
            raise ConversionError(f"--model-config-overrides {item!r}: {key} fixes weight shapes "
                                  f"and comes from config.json; only {', '.join(OVERRIDABLE_FIELDS)}"
                                  f" may change")
        try:
            overrides[key] = int(value) if key == "max_position_embeddings" else float(value)
        except ValueError:
            raise ConversionError(f"--model-config-overrides {item!r}: {value!r} is not a "
                                  f"number") from None
    return overrides


def import_checkpoint(hf: str | Path, out: str | Path, rope_base: Optional[float] = None,
                      overrides: Optional[dict] = None, tensor_parallel: int = 1,
                      pipeline_parallel: int = 1, dtype: Optional[str] = None,
                      untie_embeddings: bool = False, log=print) -> ImportResult:
    """Write an engine checkpoint root ``out`` (``out/step_00000000`` and ``out/latest``).

    RoPE stays the checkpoint's own (plain, or Llama-3.1's llama3 scaling) unless ``rope_base``
    (or a rope_base override) is given: then plain RoPE at that base, ProLong's choice. Tied
    embeddings (Llama-3.2-1B/3B) stay one matrix unless ``untie_embeddings``.

    ``tensor_parallel`` / ``pipeline_parallel``: the layout training will use; checked against
    the model now, and the vocabulary padded for it. The checkpoint loads with either layer spec
    (local or transformer-engine). ``dtype``: stored dtype; default the checkpoint's own (its
    safetensors dtype).
    """
    hf = Path(hf)
    hf_config = read_hf_config(hf)
    overrides = dict(overrides or {})
    override_base = overrides.pop("rope_base", None)
    if None not in (rope_base, override_base) and rope_base != override_base:
        raise ConversionError(f"--rope-base {rope_base:g} and the override rope_base="
                              f"{override_base:g} disagree; give one")
    rope_base = override_base if rope_base is None else rope_base
    config = hf_folder_config(hf, hf_config, rope_base, untie_embeddings)
    config = config.replace(**overrides)
    try:
        config.validate()
    except ValueError as error:
        raise ConversionError(f"--model-config-overrides: {error}") from None
    scaling = rope_scaling_of(hf_config, str(hf / "config.json"))
    if scaling is not None and config.rope_scaling is None:
        log(f"note: {hf / 'config.json'} has {scaling.get('rope_type', scaling.get('type'))} "
            f"RoPE scaling; the checkpoint uses plain RoPE at base {config.rope_base:g} as asked")
    generation = _read_optional_json(hf / "generation_config.json")
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r} must be one of {sorted(DTYPES)}")
    try:
        layout = ParallelLayout(tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel)
        layout.validate(config)
    except LayoutError as error:
        raise ConversionError(f"target layout TP{tensor_parallel} x PP{pipeline_parallel} does "
                              f"not fit {hf}: {error}") from None
    padded_vocab = config.padded_vocab_size(tensor_parallel)
    if padded_vocab != config.vocab_size:
        log(f"note: vocabulary {config.vocab_size} padded to {padded_vocab} for TP"
            f"{tensor_parallel}; load the checkpoint with that tensor-parallel size")

    tokenizer = _hf_tokenizer(hf)
    out = Path(out)
    check_new_folder(out)
    weights = HFWeightReader(hf)
    try:
        mappings = weight_mappings(config, CHECKPOINT_NORM_LAYOUT)
        _check_hf_tensors(weights, mappings, hf, config)
        stored_dtype = DTYPES[dtype] if dtype else weights.get(mappings[0].hf_names[0]).dtype
        writer = _plan_checkpoint(weights, mappings, config, padded_vocab, stored_dtype)

        with staged_folder(out, "import") as tmp:
            step_dir = tmp / "step_00000000"
            writer.write(step_dir)
            state = {
                "step": 0,
                "train_state": {},
                "scheduler": None,
                "tokenizer": tokenizer,
                "model_config": dataclasses.asdict(config),
                "world_size": layout.world_size,
                "layout": layout.to_dict(),
                # No optimizer state: load with optimizer=None and start a fresh optimizer.
                "weights_only": True,
                "hugging_face": {"source": str(hf.resolve()), "config": hf_config,
                                 "generation_config": generation,
                                 "norm_layout": CHECKPOINT_NORM_LAYOUT},
                "manifest": MANIFEST_FILE,
            }
            (step_dir / STATE_FILE).write_text(json.dumps(state, indent=1))
            write_manifest(step_dir)
            (tmp / LATEST).write_text(step_dir.name + "\n")
    finally:
        weights.close()
    result = ImportResult(out / "step_00000000", config, peak_rss_bytes())
    log(f"imported {hf} -> {result.checkpoint} ({config.describe_rope()}, "
        f"{'untied' if config.untie_embeddings else 'tied'} embeddings, "
        f"{str(stored_dtype).removeprefix('torch.')}, loadable in any layout dividing the model"
        f"{f' with TP{tensor_parallel}' if padded_vocab != config.vocab_size else ''}); "
        f"peak RSS {result.peak_rss_bytes / 2**20:.0f} MiB")
    return result


def _hf_tokenizer(hf: Path) -> Optional[dict]:
    """The record (data_tools.summary) of the folder's tokenizer, None if it has none: what
    training and evaluation compare with their data's and --tokenizer's."""
    if not any((hf / name).exists() for name in ("tokenizer.json", "tokenizer.model")):
        return None
    try:
        return load_tokenizer(str(hf)).describe()
    except TokenizerError as error:
        raise ConversionError(f"--hf {hf}: {error}") from None


def _read_optional_json(path: Path) -> Optional[dict]:
    if not path.exists():
        return None
    return read_json_object(path, "fix or delete it (it is optional)")


def _check_hf_tensors(weights: HFWeightReader, mappings, folder: Path,
                      config: LlamaConfig) -> None:
    """Every expected tensor exists with the shape config.json implies; nothing unknown."""
    expected = {}
    for mapping in mappings:
        expected.update(zip(mapping.hf_names, mapping.hf_shapes))
    config_file = folder / "config.json"
    has_head = "lm_head.weight" in weights.shapes
    if config.untie_embeddings and not has_head and not _source_tied(folder):
        raise ConversionError(
            f"{config_file}: tie_word_embeddings is false, but the safetensors files hold no "
            f"lm_head.weight; if the model ties its output layer to the embedding, set "
            f"tie_word_embeddings to true, else the folder is incomplete: re-download it")
    if "lm_head.weight" in expected and not has_head:
        # Tied source untied on purpose: the output layer starts as a copy of the embedding.
        expected.pop("lm_head.weight")
    if not config.untie_embeddings and has_head:
        _check_tied_head(weights, folder)
        expected["lm_head.weight"] = weights.shapes["lm_head.weight"]
    for name, shape in expected.items():
        if name not in weights.shapes:
            raise ConversionError(f"{folder}: tensor {name} is missing from the safetensors "
                                  f"files; the folder is incomplete or not a Llama model")
        if weights.shapes[name] != tuple(shape):
            raise ConversionError(
                f"{folder / weights.file_of(name)}: tensor {name} has shape "
                f"{weights.shapes[name]}, but config.json implies {tuple(shape)}; the weights do "
                f"not match config.json (wrong config, or a different model's shard)")
    unknown = [name for name in weights.shapes
               if name not in expected and not name.endswith(_DERIVED_HF_TENSORS)]
    if unknown:
        raise ConversionError(f"{folder / weights.file_of(unknown[0])}: tensor {unknown[0]} is "
                              f"not part of a Llama model ({len(unknown)} unknown tensors); "
                              f"only LlamaForCausalLM checkpoints can be imported")


def _source_tied(folder: Path) -> bool:
    return read_hf_config(folder).get("tie_word_embeddings") is True


def _check_tied_head(weights: HFWeightReader, folder: Path) -> None:
    """A tied config whose folder also stores lm_head.weight: it must equal the embedding."""
    embedding, head = weights.get("model.embed_tokens.weight"), weights.get("lm_head.weight")
    if embedding.shape != head.shape or not torch.equal(embedding, head):
        differ = (f"shapes {tuple(embedding.shape)} and {tuple(head.shape)}"
                  if embedding.shape != head.shape else
                  f"max |difference| {(embedding.float() - head.float()).abs().max().item():.3g}")
        raise ConversionError(
            f"{folder / 'config.json'}: tie_word_embeddings is true, but "
            f"{folder / weights.file_of('lm_head.weight')} holds an lm_head.weight that differs "
            f"from model.embed_tokens.weight ({differ}); set tie_word_embeddings to false to "
            f"keep both matrices, or import with --untie-embeddings")


def _plan_checkpoint(weights: HFWeightReader, mappings, config: LlamaConfig, padded_vocab: int,
                     dtype: torch.dtype) -> DistCheckpointWriter:
    writer = DistCheckpointWriter()
    for mapping in mappings:
        key, layer = checkpoint_key(mapping.engine_name)
        shape = mapping.engine_shape(padded_vocab)
        names = list(mapping.hf_names)
        if names == ["lm_head.weight"] and "lm_head.weight" not in weights.shapes:
            names = ["model.embed_tokens.weight"]

        def produce(mapping=mapping, names=names):
            return mapping.to_engine([weights.get(n) for n in names], config,
                                     padded_vocab).to(dtype)

        if layer is None:
            writer.add_tensor(key, shape, dtype, produce)
        else:
            writer.add_layer(key, (config.num_layers, *shape), dtype, layer, produce)
    for layer in range(config.num_layers):
        for module in _EXTRA_STATE_MODULES:
            writer.add_object(f"decoder.layers.{module}._extra_state/shard_{layer}_"
                              f"{config.num_layers}", None)
    return writer


__all__ = ["import_checkpoint", "parse_overrides", "ImportResult"]
