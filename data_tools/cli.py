"""`lce-data` / `python -m data_tools`: preprocess, import-mds, merge, stats, inspect, mix, sft."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from data_tools.inputs import InputError
from data_tools.mixture import RecipeError
from data_tools.tokenizer import TokenizerError

EXIT_BAD_INPUT = 2


def _preprocess(args) -> None:
    from data_tools.preprocess import PreprocessOptions, preprocess

    options = PreprocessOptions(json_keys=args.json_keys, group_by=args.group_by,
                                append_eos=args.append_eos, prepend_bos=args.prepend_bos,
                                min_tokens=args.min_tokens, workers=args.workers,
                                skip_bad=args.skip_bad, progress=not args.quiet,
                                allow_empty=args.allow_empty)
    summary = preprocess(args.input, args.output_prefix, args.tokenizer, options)
    print(f"wrote {summary['documents']:,} documents, {summary['tokens']:,} tokens to "
          f"{args.output_prefix}.bin/.idx in {summary['seconds']:.1f} s "
          f"({summary['tokens_per_second']:,.0f} tokens/s); skipped lines: "
          f"{summary['skipped_lines']}; filtered (< {args.min_tokens} tokens): "
          f"{summary['filtered_documents']}; summary: {args.output_prefix}.summary.json")
    for record in summary["bad_records"][:5]:
        print(f"  skipped {record['path']}:{record['line']}: {record['problem']}")
    if summary["tokenizer"]["kind"] == "huggingface":
        from data_tools.tokenizer import bpe_ranks_beside

        ranks = bpe_ranks_beside(args.tokenizer)
        if ranks:
            print(f"note: tokenizer.json is encoded by Hugging Face tokenizers; --tokenizer {ranks} "
                  f"gives the same ids several times faster (except that special-token strings "
                  f"inside raw text, such as '<|eot_id|>', stay plain text there)")


def _import_mds(args) -> None:
    from data_tools.mds import import_mds

    summary = import_mds(args.source, args.output_prefix, tokenizer_path=args.tokenizer,
                         progress=not args.quiet, allow_empty=args.allow_empty)
    print(f"wrote {summary['documents']:,} documents, {summary['tokens']:,} tokens to "
          f"{args.output_prefix}.bin/.idx in {summary['seconds']:.1f} s "
          f"({summary['tokens_per_second']:,.0f} tokens/s) from {len(summary['parts'])} part(s), "
          f"{summary['shards']} shards, {summary['samples']:,} samples; empty ranges skipped: "
          f"{summary['empty_ranges']}; tokens outside every range: "
          f"{summary['uncovered_tokens']:,}; summary: {args.output_prefix}.summary.json")


def _merge(args) -> None:
    from data_tools.stats import merge_datasets

    result = merge_datasets(args.inputs, args.output_prefix)
    print(f"merged {len(args.inputs)} datasets: {result['documents']:,} documents, "
          f"{result['tokens']:,} tokens -> {args.output_prefix}.bin/.idx")


def _stats(args) -> None:
    from data_tools.stats import dataset_stats, format_stats, plot_histogram

    stats = dataset_stats(args.prefix)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    if args.png:
        plot_histogram(stats, args.png)
        print(f"histogram: {args.png}")


def _inspect(args) -> None:
    from data_tools.stats import inspect_document, inspect_sequence

    if os.path.isdir(args.path):
        result = inspect_sequence(args.path, args.index, args.tokenizer)
    else:
        result = inspect_document(args.path, args.index, args.tokenizer)
    for key in ("text",):
        if key in result and len(result[key]) > args.max_chars:
            result[key] = result[key][:args.max_chars] + " [...]"
    if "pieces" in result:
        result["pieces"] = [p if len(p) <= args.max_chars else p[:args.max_chars] + " [...]"
                            for p in result["pieces"]]
    print(json.dumps(result, indent=2, ensure_ascii=False))


def _mix(args) -> None:
    from data_tools.mixture import build_mixture, load_recipe

    recipe = load_recipe(args.recipe, data_root=args.data_root, seq_length=args.seq_length,
                         seed=args.seed, total_tokens=args.total_tokens,
                         num_sequences=args.num_sequences)
    if args.train_config:
        recipe = _fit_to_train_config(recipe, args.train_config)
    metadata = build_mixture(recipe, args.output)
    print(f"{metadata['num_sequences']:,} sequences x {metadata['seq_length']:,} tokens; "
          f"tokens per source: {json.dumps(metadata['tokens_per_source'])}")


def _fit_to_train_config(recipe, path: str):
    """The recipe sized for the training run of the config file at `path`."""
    # The engine's own loader, so that its defaults and checks are the ones training uses;
    # it imports no torch.
    from data_tools.mixture import fit_to_run
    from engine.training.config import load_config

    config = load_config([path])
    if config.data.seq_length is not None and config.data.seq_length != recipe.seq_length:
        raise RecipeError(f"{path}: data.seq_length is {config.data.seq_length:,} but recipe "
                          f"{recipe.path} packs {recipe.seq_length:,}-token sequences; make "
                          f"them agree (or pass --seq-length)")
    return fit_to_run(recipe, config.train_steps, config.data.global_batch, path)


def _sft(args) -> None:
    from data_tools.sft import build_sft

    build_sft(args.input, args.output, args.tokenizer, args.seq_length, overflow=args.overflow,
              seed=args.seed, skip_bad=args.skip_bad, messages_key=args.messages_key,
              allow_empty=args.allow_empty)


def build_parser() -> argparse.ArgumentParser:
    from data_tools.preprocess import max_workers, usable_cpu_cores

    parser = argparse.ArgumentParser(
        prog="lce-data", description="Corpora -> Megatron indexed datasets -> packed long-context "
                                     "training data (ProLong recipe).")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser(
        "preprocess", help="tokenize JSON lines / Parquet / text folders into PREFIX.bin/.idx",
        description="Tokenize JSON lines (.jsonl, .gz, .zst), Parquet files and plain-text "
                    "folders (one file = one document) into a Megatron indexed dataset.")
    p.add_argument("--input", nargs="+", required=True, help="files or folders")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, "
                                                          "PREFIX.summary.json")
    p.add_argument("--tokenizer", required=True,
                   help="folder with tokenizer.json, Llama-3 tokenizer.model (BPE ranks; the "
                        "fastest: encoded by splintr, or tiktoken where splintr is missing or "
                        "LCE_BPE_ENCODER=tiktoken; the same ids) or a SentencePiece .model")
    p.add_argument("--json-keys", nargs="+", default=["text"],
                   help="text fields; several are joined with a blank line (default: text)")
    p.add_argument("--group-by", help="concatenate records with equal values of this key into "
                                      "one document, in input order (code repositories); a "
                                      "plain-text folder's files group by its top-level folder "
                                      "(one per repository), whatever the key")
    p.add_argument("--append-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="end each document with EOS (default: on)")
    p.add_argument("--prepend-bos", action=argparse.BooleanOptionalAction, default=False,
                   help="start each document with BOS (default: off)")
    p.add_argument("--min-tokens", type=int, default=0,
                   help="keep only documents of at least this many tokens (BOS/EOS included; "
                        ">= 0)")
    p.add_argument("--workers", type=int, default=1,
                   help=f"tokenizer processes, 1 to 2 per usable CPU core ({max_workers()} "
                        f"here: {usable_cpu_cores()} cores); default: 1")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip and count bad lines instead of stopping at the first one")
    p.add_argument("--allow-empty", action="store_true",
                   help="write a dataset without documents instead of stopping with an error")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_preprocess)

    p = commands.add_parser(
        "import-mds", help="ProLong's released data (MDS shards) -> PREFIX.bin/.idx",
        description="Import one source folder of ProLong's released, Llama-3-tokenized data "
                    "(e.g. book-65536: procNN-MM/ parts of mosaicml-streaming MDS shards) into "
                    "one indexed dataset: one document per [start, end) range of each sample's "
                    "indices, the parts in numeric order. Needs no mosaicml-streaming.")
    p.add_argument("source", help="a source folder holding procNN-MM/ parts, or one part "
                                  "(a folder with index.json)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, "
                                                          "PREFIX.summary.json")
    p.add_argument("--tokenizer", help="the data's tokenizer (Llama-3's tokenizer.model), "
                                       "recorded for `inspect` and bounding the ids; default: "
                                       "ids are checked against Llama-3's 128,256")
    p.add_argument("--allow-empty", action="store_true",
                   help="write a dataset without documents instead of stopping with an error")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_import_mds)

    p = commands.add_parser("merge", help="concatenate indexed datasets",
                            description="Concatenate indexed datasets of one tokenizer.")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("inputs", nargs="+", help="dataset prefixes, in order")
    p.set_defaults(run=_merge)

    p = commands.add_parser("stats", help="token counts and a document-length histogram",
                            description="Token counts and a document-length histogram "
                                        "(power-of-two bins) of an indexed dataset.")
    p.add_argument("prefix")
    p.add_argument("--png", help="also draw the histogram into this PNG file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_stats)

    p = commands.add_parser("inspect", help="decode document N or packed sequence N",
                            description="Decode document N of an indexed dataset (PREFIX) or "
                                        "sequence N of a packed dataset (folder).")
    p.add_argument("path", help="dataset prefix or packed dataset folder")
    p.add_argument("index", type=int, help="document or sequence number")
    p.add_argument("--tokenizer", help="default: the one recorded when the data was built")
    p.add_argument("--max-chars", type=int, default=400, help="cut decoded text at this length")
    p.set_defaults(run=_inspect)

    for name in ("mix", "pack"):
        p = commands.add_parser(
            name, help="build the packed training mixture from a YAML recipe"
            + (" (same as mix)" if name == "pack" else ""),
            description="Pack the sources of a recipe into sequences of exactly seq_length "
                        "tokens with document boundaries, mixed by weight; the index is cached "
                        "in --output and reused while recipe and inputs are unchanged.")
        p.add_argument("recipe", help="YAML file or a shipped recipe name "
                                      "(prolong-stage1-64k, prolong-stage2-512k)")
        p.add_argument("--output", required=True, help="packed dataset folder")
        p.add_argument("--data-root", help="folder the recipe's source paths are relative to")
        p.add_argument("--seq-length", type=int, help="override the recipe's seq_length")
        p.add_argument("--seed", type=int, help="override the recipe's seed")
        p.add_argument("--total-tokens", type=int, help="override the recipe's size in tokens")
        p.add_argument("--num-sequences", type=int,
                       help="override the recipe's size in sequences")
        p.add_argument("--train-config", metavar="CONFIG.yaml",
                       help="the training config this mixture feeds: draw its train_steps x "
                            "data.global_batch sequences when the recipe names no size, and "
                            "refuse a recipe smaller than that")
        p.set_defaults(run=_mix)

    p = commands.add_parser("sft", help="chat JSON lines -> packed SFT data with a loss mask",
                            description="Tokenize chat records with Llama-3's chat template "
                                        "(loss on assistant tokens only) and pack them.")
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--output", required=True, help="packed dataset folder")
    p.add_argument("--tokenizer", required=True, help="a Llama-3 tokenizer")
    p.add_argument("--seq-length", type=int, required=True, help="tokens per sequence (>= 1)")
    p.add_argument("--overflow", choices=("move", "drop"), default="move",
                   help="a conversation that does not fit the open sequence: move it to the "
                        "next one (default) or drop it (ProLong's rule)")
    p.add_argument("--seed", type=int, default=0, help="conversation shuffle seed")
    p.add_argument("--messages-key", default="messages")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip and count bad lines instead of stopping at the first one")
    p.add_argument("--allow-empty", action="store_true",
                   help="write a dataset without sequences instead of stopping with an error")
    p.set_defaults(run=_sft)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (InputError, TokenizerError, RecipeError, ValueError) as error:
        print(f"lce-data {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as error:
        # A missing input, or a write the checks before it could not foresee (a full disk):
        # the path and the reason, without a traceback. Temporary outputs are already removed.
        print(f"lce-data {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
