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

``--protocol ruler | helmet-recall`` runs a published protocol's measure instead (see
engine.evaluate.measures.ruler and .helmet_recall; ``--protocol ruler --help`` lists its flags).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import yaml

from data_tools.tokenizer import TokenizerError, load_tokenizer
from engine.checkpoint import (CheckpointError, DamagedCheckpoint, check_complete,
                               load_checkpoint, model_config_from_state, read_checkpoint_state,
                               resolve_checkpoint)
from engine.convert.export import export_checkpoint
from engine.evaluate import dry_run, hf_model
from engine.evaluate.engine_eval import padded_length, plan_for_length
from engine.evaluate.errors import EvaluationError
from engine.evaluate.inputs import (FLAGS, check_lengths, check_recorded_tokenizers,
                                    folder_tokenizer, hf_config, tokenizer_inputs)
from engine.evaluate.measures import (MeasureRequest, measures, prepare_measures,
                                      protocol_descriptions, protocol_tasks)
from engine.evaluate.measures.recall import DEFAULT_SAMPLES
from engine.evaluate.report import (CheckpointReport, EvaluationReport, check_report_folder,
                                    publish_text_report, write_report)
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
    label: str = ""  # how errors name it
    shown: str = ""  # its path in the report


@dataclass(frozen=True)
class Pipeline:
    """What the protocol's measures ask of the command (engine.evaluate.measures.Measure)."""
    protocol: str
    generation: bool  # engine checkpoints run through a temporary export, in one process
    single_model: bool  # one --hf or --checkpoint
    examples_only: bool  # without a model its examples are still written

    @classmethod
    def of(cls, protocol: str) -> "Pipeline":
        kinds = measures(protocol)
        return cls(protocol, any(m.needs_generation for m in kinds),
                   any(m.single_model for m in kinds),
                   bool(kinds) and all(m.examples_are_output for m in kinds))


def _named(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    return (name, path) if sep and name and "/" not in name else (Path(value).name, value)


def _parser(protocol: str = "ours") -> argparse.ArgumentParser:
    pipeline = Pipeline.of(protocol)
    doc = __doc__
    prog = "python -m engine.evaluate"
    if protocol != "ours":
        prog += f" --protocol {protocol}"
        # The protocol's measure module describes it.
        doc = sys.modules[type(measures(protocol)[0]).__module__].__doc__ or protocol
    description, _, epilog = doc.partition("\n\n")
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=epilog or None)
    if pipeline.generation:
        parser.add_argument("--checkpoint", action="append", default=[], metavar="PATH",
                            help="engine checkpoint to generate with, through a temporary "
                                 "Hugging Face export (one device)")
        parser.add_argument("--hf", action="append", default=[], metavar="FOLDER",
                            help="Hugging Face folder to generate with (without a model: "
                                 "examples only)")
        parser.add_argument("--export-dtype", default="bfloat16",
                            choices=("bfloat16", "float16", "float32"),
                            help="the temporary export's dtype (--checkpoint; default bfloat16)")
    else:
        parser.add_argument("--checkpoint", action="append", default=[], metavar="[NAME=]PATH",
                            help="engine checkpoint (a run directory or a step_* directory)")
        parser.add_argument("--hf", action="append", default=[], metavar="[NAME=]FOLDER",
                            help="Hugging Face folder (e.g. from engine.convert export)")
    parser.add_argument("--out", help="folder for examples.jsonl and the report (required)"
                        if pipeline.generation else "folder for report.json, report.md, PNGs "
                        "(required but with --dry-run)")
    parser.add_argument("--config", action="append", default=[],
                        help="YAML config whose parallel/kernels/eval sections apply")
    for measure in measures(protocol):
        for flag in measure.flags:
            parser.add_argument(flag.flag, dest=flag.key, **flag.options)
    if not pipeline.generation:
        parser.add_argument("--hf-scoring", choices=("generation", "teacher-forced"),
                            default="generation")
    parser.add_argument("--no-progress", action="store_true")
    described = "; ".join(f"{name}: {text}" for name, text in protocol_descriptions().items())
    parser.add_argument("--protocol", choices=tuple(protocol_tasks()), default=protocol,
                        help=f"{described}; run with --protocol NAME --help for its flags")
    parser.add_argument("--write-examples", action="store_true",
                        help="also write examples.jsonl into --out: every prompt as text with "
                             "each checkpoint's output or teacher-forced result and score")
    parser.add_argument("--check", action="store_true",
                        help="only check everything (inputs, --out, layout, lengths, tokenizer) "
                             "in this one process without any process group, and exit: 0 if "
                             "the evaluation would start, 2 naming the problem")
    if pipeline.generation:
        # Generation runs on one device: no scoring choice, no layout to simulate.
        parser.set_defaults(hf_scoring="generation", dry_run=False, world_size=None, rank=None,
                            dry_run_report=None)
    else:
        parser.set_defaults(export_dtype=None)
        add_dry_run_arguments(parser, "run one scoring forward at the longest requested length "
                              "as rank(s) of --world-size on the meta device, without weights, "
                              "data or a GPU (engine.evaluate.dry_run), and print the peak "
                              "memory")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    return parser


def _config(args, protocol: str = "ours", protocol_given: bool = True) -> TrainConfig:
    flags = {}
    for measure in measures(protocol):
        for flag in measure.flags:
            value = getattr(args, flag.key)
            if value is not None and flag.convert is not None:
                value = flag.convert(value)
            flags[flag.key] = value
    if protocol_given:
        flags["protocol"] = protocol
    overrides = [f"eval.{k}={v!r}" if isinstance(v, str) else f"eval.{k}={v}"
                 for k, v in flags.items() if v is not None]
    config = load_config(args.config, [*args.overrides, *overrides])
    if config.eval.protocol != protocol:
        raise EvaluationError(f"eval.protocol is {config.eval.protocol!r} (a --config or an "
                              f"override): run with --protocol {config.eval.protocol}, whose "
                              f"flags are its own")
    defaults = {}
    for measure in measures(protocol):
        for key, value in measure.command_defaults.items():
            if flags.get(key) is None and not _sets(args, key):
                defaults[key] = value
    return replace(config, eval=replace(config.eval, **defaults)) if defaults else config


def _sets(args, key: str) -> bool:
    """Whether an override or a --config file sets eval.<key> (load_config read them all)."""
    if any(item.split("=", 1)[0].strip() == f"eval.{key}" for item in args.overrides):
        return True
    for path in args.config:
        section = (yaml.safe_load(Path(path).read_text()) or {}).get("eval")
        if isinstance(section, dict) and key in section:
            return True
    return False


def _targets(args, pipeline: Optional[Pipeline] = None) -> list[Target]:
    pipeline = pipeline or Pipeline.of("ours")
    single = pipeline.single_model
    targets = []
    for value in args.checkpoint:
        # One model per run needs no name: the path is taken as given.
        name, path = (Path(value).name, value) if single else _named(value)
        try:
            step = resolve_checkpoint(path)
        except CheckpointError as error:
            raise CheckpointError(f"--checkpoint {path}: {error}; give a run directory of "
                                  f"engine.train or engine.convert import") from None
        # Sizes and the file list against the manifest (contents are checked by the load):
        # a checkpoint cut short or without its manifest is refused before any process group.
        check_complete(step)
        model = model_config_from_state(read_checkpoint_state(step), step)
        targets.append(Target(name, str(step), "engine", model,
                              f"--checkpoint {path}" if single else f"--checkpoint {name} ({step})",
                              path if single else str(step)))
    for value in args.hf:
        name, path = (Path(value).name, value) if single else _named(value)
        hf_config(path)
        targets.append(Target(name, path, "hf", None,
                              f"--hf {path}" if single else f"--hf {name} ({path})", path))
    if single and len(targets) > 1:
        kinds = {t.kind for t in targets}
        raise EvaluationError("give --hf or --checkpoint, not both: one model per run"
                              if len(kinds) > 1 else
                              f"give one --{targets[0].kind.replace('engine', 'checkpoint')}: "
                              f"one model per run")
    if not targets and not pipeline.examples_only:
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


def _protocol(argv) -> tuple[Optional[str], list[str]]:
    """(--protocol's value or None when it is not given, the other arguments)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, item in enumerate(argv):
        if item == "--protocol" and i + 1 < len(argv):
            return argv[i + 1], argv[:i] + argv[i + 2:]
        if item.startswith("--protocol="):
            return item.split("=", 1)[1], argv[:i] + argv[i + 1:]
    return None, argv


def _check_tokenizers(targets: list[Target], inputs: dict) -> None:
    """The ids of what is fed to each model are its own: an engine checkpoint's recorded
    tokenizer, a Hugging Face folder's own tokenizer files."""
    check_recorded_tokenizers(
        {t.label: read_checkpoint_state(t.path).get("tokenizer")
         for t in targets if t.kind == "engine"}, inputs)
    check_recorded_tokenizers({t.label: folder_tokenizer(t.path)
                               for t in targets if t.kind == "hf"}, inputs, trained="ships")


def main(argv=None, protocol: Optional[str] = None) -> int:
    """The command; ``protocol``: the --protocol when ``argv`` gives none (default ours)."""
    given, argv = _protocol(argv)
    protocol_given = given is not None or protocol is not None
    protocol = given or protocol or "ours"
    protocols = tuple(protocol_tasks())
    if protocol not in protocols:
        described = "; ".join(f"{name}: {text}" for name, text in protocol_descriptions().items())
        print(f"error: unknown --protocol {protocol!r}; choose from {', '.join(protocols)} "
              f"({described})", file=sys.stderr, flush=True)
        return 2
    pipeline = Pipeline.of(protocol)
    args = _parser(protocol).parse_args(argv)
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
        config = _config(args, protocol, protocol_given)
        section = config.eval
        targets = _targets(args, pipeline)
        # Before any haystack is built: a length no memory holds fails here, not as MemoryError.
        check_lengths(section.lengths, section.position_length,
                      {t.name: _trained_context(t) for t in targets})
        vocabularies = {f"{t.name} ({t.path})": t.model.vocab_size if t.model else
                        hf_config(t.path)["vocab_size"] for t in targets}
        # The tokenizer against the models' before any prompt is built with it.
        shared = {}
        if section.tokenizer:
            shared["tokenizer"] = load_tokenizer(section.tokenizer)
            _check_tokenizers(targets, {f"{FLAGS['tokenizer']} {section.tokenizer}":
                                        shared["tokenizer"].describe()})
        prepared = prepare_measures(MeasureRequest(section, "command", vocabularies,
                                                   shared=shared))
        if not prepared:
            asked = [m.asked for m in measures(protocol)]
            raise EvaluationError(f"nothing to measure: give {', '.join(asked[:-1])} or "
                                  f"{asked[-1]}" if len(asked) > 1 else
                                  f"nothing to measure: give {asked[0]}")
        examples = [e for _, ready in prepared for e in getattr(ready, "examples", [])]
        # The datasets' recorded tokenizers (the tokenizer itself was checked above).
        inputs = tokenizer_inputs(section, FLAGS, shared.get("tokenizer"))
        inputs.pop(f"{FLAGS['tokenizer']} {section.tokenizer}", None)
        _check_tokenizers(targets, inputs)
        on_engine = [] if pipeline.generation else [t for t in targets if t.kind == "engine"]
        if world_size > 1 and pipeline.generation:
            raise EvaluationError(f"--protocol {protocol} generates on one device in one "
                                  f"process: run without torchrun")
        if world_size > 1 and not on_engine:
            raise EvaluationError("Hugging Face folders are evaluated in one process: run "
                                  "without torchrun")
        layout = _layout(config, world_size)
        # The longest sample any measure runs: the plan is checked at that length.
        longest = padded_length(max([ready.longest for _, ready in prepared] + [2]), layout)
        plans = {target.name: _plan(target.model, layout, longest, config)
                 for target in on_engine}
        if on_engine:
            check_rendezvous_port()
        if args.check:
            where = ("generated in one process" if pipeline.generation else
                     f"layout {layout.describe()}")
            print(f"evaluation plan ok: {len(targets)} target(s), {len(examples)} "
                  f"{'recall ' if protocol == 'ours' else protocol + ' '}examples, {where}, "
                  f"samples up to {longest} tokens, report into {args.out}", flush=True)
            return 0
    except (ConfigError, LayoutError, CheckpointError, EvaluationError, TokenizerError,
            LaunchError, TypeError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2

    progress = not args.no_progress
    reports = []
    if on_engine:
        first = plans[on_engine[0].name]
        initialize_parallel(first.layout, seed=first.seed, timeout_s=first.collective_timeout_s)
        for target in on_engine:
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
        elif pipeline.generation:
            model = _exported_model(target, args.export_dtype)
            if model is None:
                return 2
            reports.append(_hf_report(target, prepared, "generation", progress, model))
    order = {t.name: i for i, t in enumerate(targets)}
    reports.sort(key=lambda r: order[r.name])
    extra = {}
    for measure, ready in prepared:
        if args.write_examples or measure.examples_are_output:
            extra.update(ready.examples_file(reports))
    if reports:
        files = write_report(EvaluationReport(reports), args.out, extra)
    else:  # examples only, for other harnesses
        publish_text_report(args.out, extra)
        files = {name: os.path.join(args.out, name) for name in extra}
    print("wrote " + ", ".join(str(path) for path in files.values()), flush=True)
    return 0


def _exported_model(target: Target, dtype: str):
    """An engine checkpoint as a transformers model, through an export to a temporary folder
    (under TMPDIR, removed once the weights are in memory); None (reported) if that fails."""
    folder = tempfile.mkdtemp(prefix="engine-export-")
    try:
        export_checkpoint(target.path, os.path.join(folder, "hf"), dtype=dtype,
                          log=lambda message: print(message, flush=True))
        return hf_model.load_hf_model(os.path.join(folder, "hf"))
    except (CheckpointError, ValueError, OSError) as error:
        print(f"error: {target.label}: {error}", file=sys.stderr, flush=True)
        return None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


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
    report = CheckpointReport(name=target.name, checkpoint=target.shown or target.path,
                              scoring=scoring, exported_from_checkpoint=target.kind == "engine"
                              and scoring == "generation")
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


def _hf_report(target, prepared, scoring, progress, model=None) -> CheckpointReport:
    """``target``'s report from a transformers model: its folder's, or ``model`` (an engine
    checkpoint's export)."""
    model = model if model is not None else hf_model.load_hf_model(target.path)
    results = [ready.run_hf(model, scoring, progress) for _, ready in prepared]
    report = _report(target, scoring.replace("-", "_"), prepared, results)
    print(f"{target.name}: recall {_mean(report.results):.3f} over {len(report.results)} "
          f"examples ({scoring})", flush=True)
    return report


def _mean(results) -> float:
    return sum(r.score for r in results) / len(results) if results else float("nan")


if __name__ == "__main__":
    sys.exit(main())
