"""Command line: ``python -m engine.convert {export,import,verify} ...`` (``--help`` on each).

Bad input (not a Llama folder, a missing shard, shapes that disagree with the config, a RoPE
scaling the engine does not implement, a layout that does not divide the model, a damaged
checkpoint or one holding NaN/Inf weights, an --out that cannot be written) prints one line
naming the file or tensor and the fix, and exits with code 2, leaving no output folder behind.
"""
from __future__ import annotations

import argparse
import sys

from engine.checkpoint import CheckpointError
from engine.convert.export import export_checkpoint
from engine.convert.hf_mapping import ConversionError
from engine.convert.importer import import_checkpoint, parse_overrides
from engine.convert.verify import verify_logits


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine.convert", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser("export", help="engine checkpoint -> Hugging Face folder")
    export.add_argument("--checkpoint", required=True,
                        help="checkpoint root (uses 'latest' or --step) or a step_* directory")
    export.add_argument("--step", type=int, help="export this step from a checkpoint root")
    export.add_argument("--out", required=True, help="Hugging Face folder to create")
    export.add_argument("--tokenizer", help="folder whose tokenizer files are copied along; its "
                        "bos/eos tokens set the config's ids")
    export.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    export.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB")

    imp = commands.add_parser("import", help="Hugging Face Llama folder -> engine checkpoint")
    imp.add_argument("--hf", required=True, help="folder with config.json and *.safetensors")
    imp.add_argument("--out", required=True, help="checkpoint root to create")
    imp.add_argument("--rope-base", type=float,
                     help="continue with plain RoPE at this base (ProLong: 8e6), replacing the "
                     "checkpoint's RoPE scaling if it has one; default: keep the checkpoint's "
                     "RoPE (plain, or Llama-3.1's llama3 scaling)")
    imp.add_argument("--untie-embeddings", action="store_true",
                     help="give a model with tied embeddings (Llama-3.2-1B/3B) an output layer of "
                     "its own, starting as a copy of the embedding; default: keep them tied")
    imp.add_argument("--model-config-overrides", nargs="*", default=[], metavar="FIELD=VALUE",
                     help="e.g. max_position_embeddings=65536 (rope_base, "
                     "max_position_embeddings, norm_eps, init_method_std)")
    imp.add_argument("--tensor-parallel", type=int, default=1,
                     help="TP size training will use: checked now, vocabulary padded for it")
    imp.add_argument("--pipeline-parallel", type=int, default=1,
                     help="PP size training will use: checked now")
    imp.add_argument("--dtype", choices=["bfloat16", "float32", "float16"],
                     help="stored dtype (default: the safetensors dtype)")

    verify = commands.add_parser(
        "verify", help="compare engine and transformers logits (loads both models in memory)")
    verify.add_argument("--checkpoint", required=True)
    verify.add_argument("--hf", required=True)
    verify.add_argument("--tolerance", type=float, default=1e-4)
    verify.add_argument("--seq-length", type=int, default=64)
    verify.add_argument("--batch", type=int, default=2)
    verify.add_argument("--seed", type=int, default=0)
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "export":
            export_checkpoint(args.checkpoint, args.out, step=args.step, tokenizer=args.tokenizer,
                              dtype=args.dtype, max_shard_size=args.max_shard_size)
        elif args.command == "import":
            import_checkpoint(args.hf, args.out, rope_base=args.rope_base,
                              overrides=parse_overrides(args.model_config_overrides),
                              tensor_parallel=args.tensor_parallel,
                              pipeline_parallel=args.pipeline_parallel, dtype=args.dtype,
                              untie_embeddings=args.untie_embeddings)
        else:
            result = verify_logits(args.checkpoint, args.hf, seq_length=args.seq_length,
                                   batch=args.batch, seed=args.seed)
            for case in ("unpacked", "packed_document_positions", "packed_continuous_positions"):
                print(f"{case}: logits max abs diff {result[case]:.3e}")
            print(f"logits max abs diff {result['max_abs_diff']:.3e} "
                  f"(tolerance {args.tolerance:g}, {result['tokens']} tokens)")
            return 0 if result["max_abs_diff"] <= args.tolerance else 1
    except (ConversionError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
