"""python -m engine.evaluate: long-context evaluation of engine checkpoints (in any parallel
layout, under torchrun) and Hugging Face folders, side by side in one report.

    python -m engine.evaluate --checkpoint base=ckpt/llama3 --checkpoint stage1=runs/stage1 \\
        --tokenizer Meta-Llama-3-8B/tokenizer.model --lengths 8192 32768 --depths 5 --out eval/
    torchrun --nproc-per-node 8 -m engine.evaluate --checkpoint runs/stage2 --lengths 524288 \\
        parallel.tensor_parallel=2 parallel.context_parallel=4 --tokenizer ... --out eval/
    python -m engine.evaluate --hf hf/prolong-64k --tokenizer hf/prolong-64k --lengths 4096 --out eval/

Engine checkpoints are scored teacher-forced (one forward pass, no KV cache, so any length the
layout holds); Hugging Face folders by real greedy generation through transformers
(``--hf-scoring teacher-forced`` for the same one-pass scoring there). Writes report.json,
report.md and PNG plots into --out. The flags set the config's ``eval`` section; ``--config``
files and ``section.key=value`` overrides (parallel.*, kernels.*, bf16, eval.*) are read as
engine.train reads them. Bad input exits with code 2 before any process group exists;
``--check`` makes every one of those checks in one process and exits (0: it would run).

    python -m engine.evaluate --dry-run --world-size 8 --checkpoint runs/stage1 --lengths 65536

``--dry-run`` runs one scoring forward at the longest requested length as ranks of
--world-size on the meta device, without weights, data or a GPU (engine.evaluate.dry_run), and
prints each rank's peak memory; the model's shape comes from the checkpoint, else the config.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import yaml

from data_tools.tokenizer import TokenizerError
from engine.checkpoint import (CheckpointError, DamagedCheckpoint, check_complete,
                               load_checkpoint, model_config_from_state, read_checkpoint_state,
                               resolve_checkpoint)
from engine.evaluate import dry_run, hf_model
from engine.evaluate.engine_eval import padded_length, plan_for_length
from engine.evaluate.errors import EvaluationError
from engine.evaluate.inputs import (FLAGS, check_lengths, check_recorded_tokenizers,
                                    folder_tokenizer, hf_config, tokenizer_inputs)
from engine.evaluate.measures import PROTOCOLS, MeasureRequest, measures, prepare_measures
from engine.evaluate.measures.recall import DEFAULT_SAMPLES
from engine.evaluate.report import (CheckpointReport, EvaluationReport, check_report_folder,
                                    write_report)
from engine.model.config import LlamaConfig, get_model_config
from engine.model.kernel_choices import KernelChoices
from engine.parallel.layout import LayoutError, ParallelLayout
from engine.parallel.setup import (LaunchError, check_rendezvous_port, destroy_parallel,
                                   initialize_parallel)
from engine.simulation import DryRunError, add_dry_run_arguments, default_ranks
from engine.training.build import build_inference_model
from engine.training.config import ConfigError, TrainConfig, load_config
from engine.training.run_plan import RunPlan

__all__ = ["main", "DEFAULT_SAMPLES"]


@dataclass
class Target:
    name: str
    path: str
    kind: str  # "engine" | "hf"
    model: Optional[LlamaConfig] = None  # engine checkpoints: the shape it was saved with


def _named(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    return (name, path) if sep and name and "/" not in name else (Path(value).name, value)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine.evaluate", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--checkpoint", action="append", default=[], metavar="[NAME=]PATH",
                        help="engine checkpoint (a run directory or a step_* directory)")
    parser.add_argument("--hf", action="append", default=[], metavar="[NAME=]FOLDER",
                        help="Hugging Face folder (e.g. from engine.convert export)")
    parser.add_argument("--out", help="folder for report.json, report.md, PNGs (required but "
                        "with --dry-run)")
    parser.add_argument("--config", action="append", default=[],
                        help="YAML config whose parallel/kernels/eval sections apply")
    for measure in measures():
        for flag in measure.flags:
            parser.add_argument(flag.flag, dest=flag.key, **flag.options)
    parser.add_argument("--hf-scoring", choices=("generation", "teacher-forced"),
                        default="generation")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="ours",
                        help="ours (this suite), ruler (RULER's tasks and metrics) or "
                             "helmet-recall (HELMET's Recall tasks); run with --protocol ruler "
                             "--help for their flags")
    parser.add_argument("--write-examples", action="store_true",
                        help="also write examples.jsonl into --out: every prompt as text with "
                             "each checkpoint's output or teacher-forced result and score")
    parser.add_argument("--check", action="store_true",
                        help="only check everything (inputs, --out, layout, lengths, tokenizer) "
                             "in this one process without any process group, and exit: 0 if "
                             "the evaluation would start, 2 naming the problem")
    add_dry_run_arguments(parser, "run one scoring forward at the longest requested length as "
                          "rank(s) of --world-size on the meta device, without weights, data or "
                          "a GPU (engine.evaluate.dry_run), and print the peak memory")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    return parser


def _config(args) -> TrainConfig:
    flags = {}
    for measure in measures():
        for flag in measure.flags:
            value = getattr(args, flag.key)
            if value is not None and flag.convert is not None:
                value = flag.convert(value)
            flags[flag.key] = value
    overrides = [f"eval.{k}={v!r}" if isinstance(v, str) else f"eval.{k}={v}"
                 for k, v in flags.items() if v is not None]
    config = load_config(args.config, [*args.overrides, *overrides])
    if args.samples is None and not _sets_samples(args):
        config = replace(config, eval=replace(config.eval, samples=DEFAULT_SAMPLES))
    return config


def _sets_samples(args) -> bool:
    """Whether an override or a --config file sets eval.samples (load_config read them all)."""
    if any(item.split("=", 1)[0].strip() == "eval.samples" for item in args.overrides):
        return True
    for path in args.config:
        section = (yaml.safe_load(Path(path).read_text()) or {}).get("eval")
        if isinstance(section, dict) and "samples" in section:
            return True
    return False


def _targets(args) -> list[Target]:
    targets = []
    for value in args.checkpoint:
        name, path = _named(value)
        try:
            step = resolve_checkpoint(path)
        except CheckpointError as error:
            raise CheckpointError(f"--checkpoint {path}: {error}; give a run directory of "
                                  f"engine.train or engine.convert import") from None
        # Sizes and the file list against the manifest (contents are checked by the load):
        # a checkpoint cut short or without its manifest is refused before any process group.
        check_complete(step)
        model = model_config_from_state(read_checkpoint_state(step), step)
        targets.append(Target(name, str(step), "engine", model))
    for value in args.hf:
        name, path = _named(value)
        hf_config(path)
        targets.append(Target(name, path, "hf"))
    if not targets:
        raise EvaluationError("nothing to evaluate: give --checkpoint PATH and/or --hf FOLDER")
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise EvaluationError(f"two targets are named alike ({names}): name them, e.g. "
                              f"--checkpoint stage1=runs/stage1")
    return targets


def _trained_context(target: Target) -> Optional[int]:
    if target.model is not None:
        return target.model.max_position_embeddings
    return hf_config(target.path).get("max_position_embeddings")


def _protocol(argv) -> tuple[str, list[str]]:
    """(--protocol's value, the other arguments); "ours" when it is not given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, item in enumerate(argv):
        if item == "--protocol" and i + 1 < len(argv):
            return argv[i + 1], argv[:i] + argv[i + 2:]
        if item.startswith("--protocol="):
            return item.split("=", 1)[1], argv[:i] + argv[i + 1:]
    return "ours", argv


def main(argv=None) -> int:
    protocol, argv = _protocol(argv)
    if protocol not in PROTOCOLS:
        print(f"error: unknown --protocol {protocol!r}; choose from {', '.join(PROTOCOLS)} "
              f"(ours: this suite at exact lengths and depths; ruler: RULER's tasks and metrics; "
              f"helmet-recall: HELMET's Recall tasks on its data)",
              file=sys.stderr, flush=True)
        return 2
    if protocol != "ours":
        from engine.evaluate import ruler_command
        return ruler_command.main(argv, protocol)
    args = _parser().parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.world_size is not None:
        if not (args.check or args.dry_run) or args.world_size < 1:
            print(f"error: --world-size {args.world_size}: give the run's number of processes "
                  f"(>= 1), with --check or --dry-run only (torchrun sets them for a run)",
                  file=sys.stderr, flush=True)
            return 2
        world_size = args.world_size
    if args.dry_run:
        return _dry_run(args, world_size)
    if args.rank is not None or args.dry_run_report:
        print("error: --rank and --dry-run-report go with --dry-run (torchrun sets a run's ranks)",
              file=sys.stderr, flush=True)
        return 2
    try:
        if not args.out:
            raise EvaluationError("--out FOLDER is required: the folder for report.json, "
                                  "report.md and the plots")
        check_report_folder(args.out)
        config = _config(args)
        section = config.eval
        targets = _targets(args)
        # Before any haystack is built: a length no memory holds fails here, not as MemoryError.
        check_lengths(section.lengths, section.position_length,
                      {t.name: _trained_context(t) for t in targets})
        vocabularies = {f"{t.name} ({t.path})": t.model.vocab_size if t.model else
                        hf_config(t.path)["vocab_size"] for t in targets}
        prepared = prepare_measures(MeasureRequest(section, "command", vocabularies))
        if not prepared:
            asked = [m.asked for m in measures()]
            raise EvaluationError(f"nothing to measure: give {', '.join(asked[:-1])} or "
                                  f"{asked[-1]}")
        recall = next((ready for measure, ready in prepared if measure.name == "recall"), None)
        examples = recall.examples if recall is not None else []
        engine_targets = [t for t in targets if t.kind == "engine"]
        inputs = tokenizer_inputs(section, FLAGS, recall.suite.tokenizer if recall else None)
        check_recorded_tokenizers(
            {f"--checkpoint {t.name} ({t.path})": read_checkpoint_state(t.path).get("tokenizer")
             for t in engine_targets}, inputs)
        check_recorded_tokenizers(
            {f"--hf {t.name} ({t.path})": folder_tokenizer(t.path)
             for t in targets if t.kind == "hf"}, inputs, trained="ships")
        if world_size > 1 and any(t.kind == "hf" for t in targets) and not engine_targets:
            raise EvaluationError("Hugging Face folders are evaluated in one process: run "
                                  "without torchrun")
        layout = _layout(config, world_size)
        # The longest sample any measure runs: the plan is checked at that length.
        longest = padded_length(max([ready.longest for _, ready in prepared] + [2]), layout)
        plans = {target.name: _plan(target.model, layout, longest, config)
                 for target in engine_targets}
        if engine_targets:
            check_rendezvous_port()
        if args.check:
            print(f"evaluation plan ok: {len(targets)} target(s), {len(examples)} recall "
                  f"examples, layout {layout.describe()}, samples up to {longest} tokens, "
                  f"report into {args.out}", flush=True)
            return 0
    except (ConfigError, LayoutError, CheckpointError, EvaluationError, TokenizerError,
            LaunchError, TypeError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2

    progress = not args.no_progress
    reports = []
    if engine_targets:
        first = plans[engine_targets[0].name]
        initialize_parallel(first.layout, seed=first.seed, timeout_s=first.collective_timeout_s)
        for target in engine_targets:
            plan = plans[target.name]
            chunks = build_inference_model(plan)
            if not _load_or_report(target, chunks):
                return 2
            reports.append(_engine_report(target, chunks, plan, prepared, progress))
            del chunks
        destroy_parallel()
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        return 0
    for target in targets:
        if target.kind == "hf":
            reports.append(_hf_report(target, prepared, args.hf_scoring, progress))
    order = {t.name: i for i, t in enumerate(targets)}
    reports.sort(key=lambda r: order[r.name])
    extra = {}
    if args.write_examples:
        for _, ready in prepared:
            extra.update(ready.examples_file(reports))
    files = write_report(EvaluationReport(reports), args.out, extra)
    print("wrote " + ", ".join(str(path) for path in files.values()), flush=True)
    return 0


def _layout(config: TrainConfig, world_size: int) -> ParallelLayout:
    # Evaluation trains nothing: no optimizer to shard, no activations kept to recompute.
    return replace(config.parallel, distributed_optimizer=False,
                   recompute="none").with_world_size(world_size)


def _plan(model: LlamaConfig, layout: ParallelLayout, longest: int, config: TrainConfig,
          device: Optional[torch.device] = None, bf16: Optional[bool] = None) -> RunPlan:
    """The evaluation plan of ``model`` for samples up to ``longest`` tokens."""
    return RunPlan.create(
        model.replace(max_position_embeddings=max(longest, model.max_position_embeddings)),
        layout, seq_length=longest, global_batch=layout.data_parallel * layout.pipeline_parallel,
        kernels=KernelChoices(**config.kernels), bf16=config.bf16 if bf16 is None else bf16,
        seed=config.seed, collective_timeout_s=config.collective_timeout_s, device=device)


def _dry_run(args, world_size: int) -> int:
    """``--dry-run``: every check first (no weights, data or tokenizer needed), then
    engine.evaluate.dry_run for the longest requested sample."""
    try:
        if args.hf:
            raise EvaluationError("--dry-run simulates the GPU path of engine checkpoints: leave "
                                  "out --hf (Hugging Face folders run in one process through "
                                  "transformers)")
        if len(args.checkpoint) > 1:
            raise EvaluationError(f"--dry-run takes one model: give one --checkpoint (got "
                                  f"{len(args.checkpoint)}), or none and the config's model")
        config = _config(args)
        section = config.eval
        if args.checkpoint:
            target = _targets(args)[0]
            model, source = target.model, f"--checkpoint {target.path}"
        else:
            try:
                model = get_model_config(config.model.name, **config.model.overrides)
            except (TypeError, ValueError) as error:
                raise ConfigError(f"model: {error}") from None
            source = f"the config's model ({config.model.name})"
        if not section.lengths and not section.position_length:
            raise EvaluationError("nothing to simulate: give --lengths (recall prompt lengths) "
                                  "and/or --position-length")
        check_lengths(section.lengths, section.position_length,
                      {source: model.max_position_embeddings})
        layout = _layout(config, world_size)
        if args.rank is not None and not 0 <= args.rank < world_size:
            raise EvaluationError(f"--rank {args.rank} is outside the {world_size} ranks of "
                                  f"{layout.describe()}: pick 0..{world_size - 1}")
        sample = dry_run.longest_sample(section.lengths, section.position_length)
        longest = padded_length(sample.tokens, layout)
        # The plan a GPU evaluation makes: kernels resolved for the simulated device, bf16 by
        # default as on a GPU.
        plan = plan_for_length(_plan(model, layout, longest, config, torch.device("meta"),
                                     True if config.bf16 is None else config.bf16),
                               longest, model.max_position_embeddings)
    except (ConfigError, LayoutError, CheckpointError, EvaluationError, TypeError,
            ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    ranks = [args.rank] if args.rank is not None else default_ranks(layout)
    try:
        return dry_run.run(plan, sample, world_size, ranks, args.dry_run_report)
    except DryRunError as error:
        print(f"error: dry run: {error}", file=sys.stderr, flush=True)
        return 1


def _load_or_report(target: Target, chunks) -> bool:
    """Load ``target`` into ``chunks``; a file whose contents differ from its manifest (found
    only by reading it, which the ranks share) ends the evaluation with exit 2 naming it."""
    try:
        load_checkpoint(target.path, chunks, model_config=target.model)
    except DamagedCheckpoint as error:
        print(f"error: --checkpoint {target.path}: {error}; give an intact checkpoint (e.g. an "
              f"earlier step_*)", file=sys.stderr, flush=True)
        destroy_parallel()
        return False
    return True


def _report(target, scoring, prepared, results) -> CheckpointReport:
    """``target``'s report: each measure's part of it from its result."""
    report = CheckpointReport(name=target.name, checkpoint=target.path, scoring=scoring)
    report.results = []  # per recall example, for --write-examples (not part of report.json)
    for (_, ready), result in zip(prepared, results):
        ready.contribute(report, result)
    return report


def _engine_report(target, chunks, plan, prepared, progress) -> CheckpointReport:
    trained = target.model.max_position_embeddings
    results = [ready.run_engine(chunks, plan, trained, progress) for _, ready in prepared]
    report = _report(target, "teacher_forced", prepared, results)
    if dist.get_rank() == 0:
        print(f"{target.name}: recall {_mean(report.results):.3f} over "
              f"{len(report.results)} examples", flush=True)
    return report


def _hf_report(target, prepared, scoring, progress) -> CheckpointReport:
    model = hf_model.load_hf_model(target.path)
    results = [ready.run_hf(model, scoring, progress) for _, ready in prepared]
    report = _report(target, scoring.replace("-", "_"), prepared, results)
    print(f"{target.name}: recall {_mean(report.results):.3f} over {len(report.results)} "
          f"examples ({scoring})", flush=True)
    return report


def _mean(results) -> float:
    return sum(r.score for r in results) / len(results) if results else float("nan")


if __name__ == "__main__":
    sys.exit(main())
