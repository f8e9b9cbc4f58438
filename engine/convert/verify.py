"""Check an export: the engine model and transformers' LlamaForCausalLM give the same logits.

Both models are built in this process in fp32 (the engine one in the single-process layout,
loaded from the engine checkpoint; the transformers one from the exported folder) and run on the
same random tokens, in three ways:

- unpacked: ``batch`` sequences of ``seq_length`` tokens, positions 0..L-1;
- packed, per-document positions: one sequence of several documents, the engine's
  document-masked attention against transformers run on each document alone;
- packed, continuous positions (ProLong): as above, transformers given the same positions.

Meant for small models and CI: an 8B check holds both models in fp32 (~70 GB of host memory).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from engine.checkpoint import (load_checkpoint, model_config_from_state, read_checkpoint_state,
                               resolve_checkpoint)
from engine.checkpoint import SHAPE_FIELDS
from engine.convert.hf_mapping import ConversionError
from engine.convert.importer import check_hf_folder
from engine.model.config import LlamaConfig
from engine.device import to_accelerator
from engine.model.kernel_choices import KernelChoices
from engine.parallel.layout import ParallelLayout
from engine.parallel.ports import free_port
from engine.parallel.setup import destroy_parallel, initialize_parallel
from engine.training.build import build_inference_model
from engine.training.data import build_micro_batch
from engine.training.run_plan import RunPlan


def _random_doc_lengths(total: int, generator: torch.Generator) -> np.ndarray:
    """Three to five documents of random lengths summing to ``total``."""
    count = int(torch.randint(3, 6, (1,), generator=generator))
    cuts = torch.randperm(total - 1, generator=generator)[:count - 1].add(1).sort().values
    edges = [0, *cuts.tolist(), total]
    return np.diff(edges)


def check_same_model(model: LlamaConfig, folder: LlamaConfig, checkpoint: Path,
                     hf_folder: Path) -> None:
    """ConversionError unless the checkpoint and the folder are the same architecture with the
    same kind of RoPE (a different base alone is left to the logits to show)."""
    differences = [f"{field} {getattr(model, field)} vs {getattr(folder, field)}"
                   for field in (*SHAPE_FIELDS, "rope_scaling")
                   if getattr(model, field) != getattr(folder, field)]
    if not differences:
        return
    rope = ""
    if model.rope_scaling != folder.rope_scaling:
        rope = (f" The checkpoint uses {model.describe_rope()}, the folder {folder.describe_rope()}:"
                f" their logits agree at short lengths and part beyond the original context, so"
                f" no logit check compares them (an import with --rope-base replaces the"
                f" folder's scaling on purpose).")
    raise ConversionError(
        f"{hf_folder / 'config.json'} describes another model than {checkpoint} "
        f"({'; '.join(differences)}: checkpoint vs folder).{rope} Verify the checkpoint against "
        f"its own export (python -m engine.convert export --checkpoint {checkpoint} --out DIR)")


def verify_logits(checkpoint: str | Path, hf_folder: str | Path, seq_length: int = 64,
                  batch: int = 2, seed: int = 0) -> dict:
    """Max |engine - transformers| logit difference per case, and the worst one.

    Returns {'unpacked': float, 'packed_document_positions': float,
    'packed_continuous_positions': float, 'max_abs_diff': float, 'tokens': int}.
    """
    from transformers import LlamaForCausalLM  # a test extra, not an engine dependency

    # The folder import would refuse is refused here too, before either model is loaded, and
    # so is a folder of another model than the checkpoint's.
    path = resolve_checkpoint(checkpoint)
    model = model_config_from_state(read_checkpoint_state(path), path)
    check_same_model(model, check_hf_folder(Path(hf_folder)), path, Path(hf_folder))
    vocab = model.vocab_size
    generator = torch.Generator().manual_seed(seed)
    unpacked = torch.randint(0, vocab, (batch, seq_length), generator=generator)
    packed_tokens = torch.randint(0, vocab, (seq_length,), generator=generator).numpy()
    doc_lengths = _random_doc_lengths(seq_length, generator)
    packed = {mode: build_micro_batch([packed_tokens], [doc_lengths], position_mode=mode)
              for mode in ("document", "continuous")}

    hf_model = LlamaForCausalLM.from_pretrained(str(hf_folder), dtype=torch.float32,
                                                attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = {"unpacked": hf_model(input_ids=unpacked).logits}
        for mode, micro_batch in packed.items():
            # Each document alone, at the positions the packed sequence gives it.
            pieces, start = [], 0
            for length in doc_lengths:
                window = slice(start, start + int(length))
                pieces.append(hf_model(input_ids=micro_batch.tokens[:, window],
                                       position_ids=micro_batch.position_ids[:, window]).logits)
                start += int(length)
            theirs[f"packed_{mode}_positions"] = torch.cat(pieces, dim=1)
    del hf_model

    if "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    plan = RunPlan.create(model, ParallelLayout(), seq_length=seq_length, global_batch=1,
                          kernels=KernelChoices.parse("all=torch"), bf16=False,
                          device=torch.device("cpu"))
    initialize_parallel(plan.layout, seed=plan.seed)
    try:
        (chunk,) = build_inference_model(plan)
        load_checkpoint(path, [chunk], model_config=model)
        chunk.eval()
        with torch.no_grad():
            # The model is on the accelerator (build_inference_model); inputs go there, logits come back.
            ours = {"unpacked": chunk(to_accelerator(unpacked), to_accelerator(
                torch.arange(seq_length).expand_as(unpacked)), None).cpu()}
            for mode, micro_batch in packed.items():
                micro_batch = micro_batch.to_accelerator()
                ours[f"packed_{mode}_positions"] = chunk(
                    micro_batch.tokens, micro_batch.position_ids, None,
                    packed_seq_params=micro_batch.packed_seq_params()).cpu()
    finally:
        destroy_parallel()

    result = {case: (ours[case][..., :model.vocab_size].float() - theirs[case].float())
              .abs().max().item() for case in theirs}
    result["max_abs_diff"] = max(result.values())
    result["tokens"] = unpacked.numel() + 2 * seq_length
    return result
