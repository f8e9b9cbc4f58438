"""Check an export: the engine model and transformers' LlamaForCausalLM give the same logits.

Both models are built in this process in fp32 (the engine one in the single-process layout,
loaded from the engine checkpoint; the transformers one from the exported folder) and run on the
same random tokens. Meant for small models and CI; an 8B check needs ~70 GB of host memory.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import torch


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def engine_logits(checkpoint: str | Path, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [batch, seq, vocab] (padding removed) of the engine model in ``checkpoint``."""
    from engine.checkpoint import load_checkpoint, read_checkpoint_state
    from engine.convert.export import model_config_from_state, resolve_checkpoint
    from engine.model.build import build_model_chunks, transformer_config
    from engine.parallel.layout import ParallelLayout
    from engine.parallel.setup import destroy_parallel, initialize_parallel

    path = resolve_checkpoint(checkpoint)
    model = model_config_from_state(read_checkpoint_state(path), path)
    if "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    layout = ParallelLayout()
    initialize_parallel(layout, model)
    try:
        (chunk,) = build_model_chunks(model, transformer_config(model, layout))
        load_checkpoint(path, [chunk], model_config=model, load_rng=False)
        chunk.eval()
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        with torch.no_grad():
            logits = chunk(tokens, positions, None)
        return logits[..., :model.vocab_size].float()
    finally:
        destroy_parallel()


def hf_logits(folder: str | Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                             attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def verify_logits(checkpoint: str | Path, hf_folder: str | Path, seq_length: int = 64,
                  batch: int = 2, seed: int = 0) -> dict:
    """{'max_abs_diff': float, 'tokens': int} between the two models on random tokens."""
    import json

    vocab = json.loads((Path(hf_folder) / "config.json").read_text())["vocab_size"]
    tokens = torch.randint(0, vocab, (batch, seq_length), generator=torch.Generator().manual_seed(seed))
    ours = engine_logits(checkpoint, tokens)
    theirs = hf_logits(hf_folder, tokens)
    return {"max_abs_diff": (ours - theirs).abs().max().item(), "tokens": tokens.numel()}
