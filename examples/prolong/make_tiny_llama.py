"""Write a randomly initialized Hugging Face LlamaForCausalLM of an engine model shape.

TINY=1 stands it in for Meta-Llama-3-8B-Instruct so that examples/prolong/03_import_model.sh
imports it exactly as it imports the real one. The folder gets config.json, safetensors
weights and the tokenizer files of --tokenizer-dir; it appears only when complete.

    python examples/prolong/make_tiny_llama.py --model tiny-llama3-vocab --out DIR --tokenizer-dir TOK
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

LLAMA3_BOS, LLAMA3_EOS = 128_000, 128_009  # <|begin_of_text|>, <|eot_id|> (Instruct)
ORIGINAL_ROPE_BASE = 500_000.0  # Llama-3's, raised by the import as for the real model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="engine model name, e.g. tiny-llama3-vocab")
    parser.add_argument("--out", required=True, help="folder to create")
    parser.add_argument("--tokenizer-dir", required=True,
                        help="folder with tokenizer.json / tokenizer_config.json to copy along")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch
    import transformers

    from engine.convert.hf_mapping import hf_config_from_llama
    from engine.model.config import get_model_config

    out = Path(args.out)
    if out.exists():
        print(f"error: {out} already exists; delete it or choose another --out", file=sys.stderr)
        return 2
    tokenizer_files = [p for p in sorted(Path(args.tokenizer_dir).glob("*"))
                       if p.name.startswith(("tokenizer", "special_tokens"))]
    if not any(p.name == "tokenizer.json" for p in tokenizer_files):
        print(f"error: --tokenizer-dir {args.tokenizer_dir} has no tokenizer.json",
              file=sys.stderr)
        return 2
    shape = get_model_config(args.model).replace(rope_base=ORIGINAL_ROPE_BASE)
    config = transformers.LlamaConfig(**hf_config_from_llama(
        shape, torch.float32, LLAMA3_BOS, LLAMA3_EOS))
    torch.manual_seed(args.seed)
    model = transformers.LlamaForCausalLM(config)
    staging = out.parent / f".{out.name}.tmp-make"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    for path in tokenizer_files:
        shutil.copy2(path, staging / path.name)
    os.replace(staging, out)
    print(f"wrote {out}: random LlamaForCausalLM of {args.model} "
          f"({sum(p.numel() for p in model.parameters()):,} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
