"""Hugging Face <-> engine checkpoint conversion, both ways, for any parallel layout.

    python -m engine.convert export --checkpoint CKPT --out HF_DIR [--tokenizer DIR]
    python -m engine.convert import --hf HF_DIR --out CKPT [--rope-base 8e6]
    python -m engine.convert verify --checkpoint CKPT --hf HF_DIR

The name and tensor mapping lives in ``engine.convert.hf_mapping``; both directions stream one
tensor (or one layer) at a time.
"""
from engine.convert.hf_mapping import ConversionError

__all__ = ["ConversionError"]
