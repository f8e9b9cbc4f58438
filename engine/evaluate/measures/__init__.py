"""The evaluation's measures and task lists, in one registry that ``python -m engine.evaluate``
and evaluation inside training (engine.evaluate.validation) both read.

A measure is one object (a ``Measure``) that, given the config's ``eval`` section:

    prepared = measure.prepare(request)  # its inputs built and checked: no model, no process
                                         # group; None when the section does not ask for it
    prepared.longest                     # tokens of its longest sample (plans are checked at it)
    result = prepared.run_engine(chunks, plan, trained_context, progress)  # collective
    result = prepared.run_hf(model, scoring, progress)  # a transformers model (hf_model)
    prepared.contribute(report, result)  # its part of the CheckpointReport (report.json/.md)
    prepared.metrics(result)             # its scalars in the training log (eval/...), if any
    prepared.examples_file(reports)      # with --write-examples: {file name: text}, if any

``measures(protocol)`` lists the measures of one protocol (``--protocol``, eval.protocol), in
the order they run; each is a module of this package holding ``MEASURE = SomeMeasure()``, found
when the registry is first read. "ours" holds recall (this suite of engine.evaluate.tasks),
loss by position and the short-document loss; "ruler" and "helmet-recall" one measure each
(ruler.py, helmet_recall.py: published protocols scored by greedy generation, generated.py
holding what they share). ``PROTOCOL_TASKS`` (and ``protocol_tasks()``) names the tasks of each protocol, read from the
measures.

What a measure declares, the command honours for every protocol alike: ``flags`` (its options,
each setting an ``eval.<key>``), ``command_defaults`` (settings the command gives when neither a
flag nor a config does), ``stages``, and three properties: ``needs_generation`` (it runs only on
a transformers model: the command exports an engine checkpoint to a temporary Hugging Face
folder first and runs in one process), ``single_model`` (its report describes one model) and
``examples_are_output`` (its examples file is written on every run, also without a model).

How to add a measure:

1. Write ``engine/evaluate/measures/<name>.py`` with a ``Measure`` subclass and
   ``MEASURE = <Name>()``: its ``name``, ``order`` (where it runs among the others), ``flags``,
   ``asked`` (the option that asks for it, named in "nothing to measure"), ``prepare`` (read and
   check its inputs, raising EvaluationError naming the setting through ``request.names``), and
   a ``Prepared`` with ``run_engine`` (through engine.evaluate.engine_eval / engine_scores),
   ``run_hf`` and ``contribute``. The command, the ``--check`` run and the final evaluation of a
   training run pick it up from here; give it ``stages`` ("interval") to run every
   eval.interval steps too.
2. Test it in ``tests/engine/test_evaluate_<name>.py`` (its numbers on a tiny model against a
   plain reference, and a bad input of each kind it refuses).
3. Give its part of the report a field in ``engine.evaluate.report.CheckpointReport`` with its
   table in ``render_markdown`` (the report's template) and, if it has one, its plot.

How to add a protocol: a ``generated.GeneratedProtocol`` subclass in its own module here, with
``protocols = ("<name>",)``, its ``protocol_description``, ``tasks``, ``data_flags``, ``build`` (every example, from the
protocol's data) and ``score`` (one generated text against the gold values): ``--protocol``
takes its name from there; its report is report.py's protocol document (``ProtocolResult``). A task of
an existing protocol is a builder in its module (engine.evaluate.ruler, engine.evaluate.helmet)
and a name in its task list.

A new setting of the ``eval`` section is declared in ``engine.training.config.EvalSection``.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable, Optional

from engine.evaluate.errors import EvaluationError
from engine.evaluate.inputs import FLAGS, SETTINGS, SHORT_LENGTH
from engine.evaluate.tasks import depth_sweep
from engine.training.config import EvalSection


# Where a measure is prepared: the command (every measure asked for), during training every
# eval.interval steps ("interval": only measures that list it, at eval.lengths) and the final
# evaluation of a training run ("final": every measure, at eval.final_lengths).
STAGES = ("command", "interval", "final")


@dataclass
class Flag:
    """One option of the command: ``--flag`` sets ``eval.<key>``; ``convert`` turns the parsed
    value into the setting (raising EvaluationError naming the flag)."""
    key: str
    flag: str
    options: dict = field(default_factory=dict)  # argparse.add_argument keywords
    convert: Optional[Callable] = None


@dataclass
class MeasureRequest:
    """What a measure is prepared for: the ``eval`` section, the stage, the vocabulary of each
    model it will run on ({what, for errors: vocab_size}), how errors name the settings (the
    command's flags or the config's eval.* keys) and a cache the stages of one run share."""
    section: EvalSection
    stage: str = "command"
    vocabularies: dict = field(default_factory=dict)
    names: dict = field(default_factory=lambda: dict(FLAGS))
    shared: dict = field(default_factory=dict)


class Prepared:
    """A measure ready to run (see the module docstring)."""
    longest: int = 2

    def run_engine(self, chunks, plan, trained_context: Optional[int], progress: bool):
        raise NotImplementedError

    def run_hf(self, model, scoring: str, progress: bool):
        raise NotImplementedError

    def contribute(self, report, result) -> None:
        raise NotImplementedError

    def metrics(self, result) -> dict:
        return {}

    def examples_file(self, reports) -> dict[str, str]:
        """Per-example files written with --write-examples ({name in REPORT_FILES: text})."""
        return {}


class Measure:
    name: str = ""
    order: int = 100
    flags: tuple = ()
    asked: str = ""
    stages: tuple = ("command", "final")
    tasks: tuple = ()  # the task names it takes (--tasks), if any
    # The --protocol values (eval.protocol) the command runs it under.
    protocols: tuple = ("ours",)
    # Settings the command gives when neither a flag nor a config sets them ({eval key: value}).
    command_defaults: dict = {}
    # Runs only on a transformers model (run_hf with greedy generation): the command exports an
    # engine checkpoint to a temporary Hugging Face folder first, in one process.
    needs_generation: bool = False
    # Its report describes one model (give --hf or --checkpoint, not both).
    single_model: bool = False
    # Its examples_file is an output of its own: written on every run, with no model too
    # ("examples only", for other harnesses), not only with --write-examples.
    examples_are_output: bool = False
    # What its protocol is, in the "unknown --protocol" message (one measure of each protocol
    # says it).
    protocol_description: str = ""

    def prepare(self, request: MeasureRequest) -> Optional[Prepared]:
        raise NotImplementedError


def depths(section: EvalSection) -> list[float]:
    """eval.depths as fractions: a count swept over [0, 1], or the list given."""
    value = section.depths
    if isinstance(value, int) and not isinstance(value, bool):
        return depth_sweep(value)
    if isinstance(value, list) and value and all(
            isinstance(d, (int, float)) and not isinstance(d, bool) for d in value):
        return [float(d) for d in value]
    raise EvaluationError(f"eval.depths {value!r}: give a count (e.g. 5) or a list of fractions "
                          f"in [0, 1]")


def short_limit(section: EvalSection) -> int:
    """Documents shorter than this are short: the position length, or SHORT_LENGTH without one."""
    return section.position_length or SHORT_LENGTH


_REGISTRY: list[Measure] = []


def measures(protocol: Optional[str] = "ours") -> list[Measure]:
    """The measures of ``protocol`` (None: every measure of this package), in ``order``."""
    if not _REGISTRY:
        found = []
        for info in pkgutil.iter_modules(__path__):
            module = importlib.import_module(f"{__name__}.{info.name}")
            measure = getattr(module, "MEASURE", None)
            if measure is not None:
                found.append(measure)
        _REGISTRY.extend(sorted(found, key=lambda m: (m.order, m.name)))
    return [m for m in _REGISTRY if protocol is None or protocol in m.protocols]


def protocol_descriptions() -> dict[str, str]:
    """{protocol: what it is}, from the measures that describe their protocol."""
    found: dict[str, str] = {}
    for measure in measures(None):
        for protocol in measure.protocols:
            if measure.protocol_description:
                found.setdefault(protocol, measure.protocol_description)
    return found


def protocol_tasks() -> dict[str, tuple]:
    """{protocol: the tasks of its measures}, "ours" first (engine.evaluate.tasks' suite at
    exact lengths and depths: the command's default, and what training measures), then the
    published protocols in their measures' order."""
    found: dict[str, tuple] = {"ours": ()}
    for measure in measures(None):
        for protocol in measure.protocols:
            found[protocol] = found.get(protocol, ()) + tuple(
                t for t in measure.tasks if t not in found.get(protocol, ()))
    return found


def __getattr__(name: str):
    # PROTOCOL_TASKS and PROTOCOLS are read from the registry when asked for, so that a
    # protocol is declared once, by its measure.
    if name == "PROTOCOL_TASKS":
        return protocol_tasks()
    if name == "PROTOCOLS":
        return tuple(protocol_tasks())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def prepare_measures(request: MeasureRequest) -> list[tuple[Measure, Prepared]]:
    """Every measure the request's stage runs that its section asks for, prepared: at the
    command's stage those of eval.protocol, during training those of "ours"."""
    if request.stage not in STAGES:
        raise ValueError(f"stage {request.stage!r}; one of {', '.join(STAGES)}")
    protocol = request.section.protocol if request.stage == "command" else "ours"
    prepared = []
    for measure in measures(protocol):
        if request.stage in measure.stages:
            ready = measure.prepare(request)
            if ready is not None:
                prepared.append((measure, ready))
    return prepared


def training_request(section: EvalSection, stage: str, vocab_size: int,
                     shared: dict) -> MeasureRequest:
    """The request of evaluation inside training: errors name the eval.* settings."""
    return MeasureRequest(section, stage, {"the model": vocab_size}, dict(SETTINGS), shared)


__all__ = ["PROTOCOL_TASKS", "PROTOCOLS", "STAGES", "Flag", "MeasureRequest", "Prepared",
           "Measure", "depths", "short_limit", "measures", "prepare_measures",
           "training_request", "protocol_descriptions", "protocol_tasks"]
