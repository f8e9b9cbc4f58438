"""The measure registry (engine.evaluate.measures) drives both `python -m engine.evaluate` and
evaluation inside training: a measure registered once gets its flag and its place in "nothing to
measure", is prepared, run and reported by the command, and by the final evaluation of a
training run; the command's shared checks (depths, the short-document limit) come from it."""
import json
from dataclasses import dataclass

import numpy as np
import pytest

from engine.evaluate import measures as registry
from engine.evaluate.errors import EvaluationError
from engine.evaluate.measures import (PROTOCOL_TASKS, Flag, Measure, MeasureRequest, Prepared,
                                      depths, short_limit)
from engine.evaluate.measures.generated import GeneratedProtocol
from engine.evaluate.measures.recall import Recall
from engine.evaluate.position_loss import ShortDocumentLoss
from engine.evaluate.validation import Validation
from engine.model.config import get_model_config
from engine.parallel.layout import ParallelLayout
from engine.training.config import EvalSection
from engine.training.run_plan import RunPlan
from tests.engine.test_convert_layouts import random_hf_llama

PROBE_TOKENS = np.arange(3, 40, dtype=np.int64)


class _PreparedProbe(Prepared):
    """Scores PROBE_TOKENS: on a transformers model with its real token losses; on the engine
    with the plan it was handed (the training plan, so the test needs no process group)."""

    def __init__(self, stage, calls):
        self.stage, self.calls, self.longest = stage, calls, len(PROBE_TOKENS)

    def run_engine(self, chunks, plan, trained_context, progress):
        self.calls.append(("engine", self.stage))
        return plan.seq_length, 0.5

    def run_hf(self, model, scoring, progress):
        from engine.evaluate.hf_model import token_losses
        self.calls.append(("hf", self.stage))
        losses = token_losses(model, PROBE_TOKENS)
        return len(losses), float(np.mean(losses))

    def contribute(self, report, result):
        tokens, loss = result
        report.short_document_loss = ShortDocumentLoss(documents=1, tokens=tokens, loss=loss)

    def metrics(self, result):
        return {"probe": result[1]}


class _Probe(Measure):
    name, order, asked = "probe", 99, "--probe-seed (the probe)"
    stages = ("command", "interval", "final")
    flags = (Flag("seed", "--probe-seed", {"type": int}),)

    def __init__(self):
        self.calls, self.requests = [], []

    def prepare(self, request):
        self.requests.append(request)
        return _PreparedProbe(request.stage, self.calls)


@pytest.fixture
def probe(monkeypatch):
    """The registry with a probe measure registered once, after the shipped ones."""
    probe = _Probe()
    monkeypatch.setattr(registry, "_REGISTRY", [*registry.measures(), probe])
    return probe


def test_the_shipped_measures_and_protocols_are_registered():
    assert [m.name for m in registry.measures()] == ["recall", "position_loss",
                                                     "short_document_loss"]
    assert list(PROTOCOL_TASKS) == ["ours", "ruler", "helmet-recall"]
    assert "niah_single" in PROTOCOL_TASKS["ours"] and "vt" in PROTOCOL_TASKS["ruler"]
    # Each protocol says what it is (the "unknown --protocol" message), from its measure.
    assert list(registry.protocol_descriptions()) == list(PROTOCOL_TASKS)


def test_one_registry_drives_the_command(probe, tmp_path, capsys):
    from engine.evaluate.__main__ import _parser, main
    random_hf_llama(tmp_path / "hf")
    assert "--probe-seed" in _parser().format_help()
    out = tmp_path / "out"
    assert main(["--hf", f"tiny={tmp_path / 'hf'}", "--probe-seed", "3", "--no-progress",
                 "--out", str(out)]) == 0
    assert [r.stage for r in probe.requests][-1] == "command"
    assert probe.requests[-1].section.seed == 3  # its flag set eval.seed
    assert probe.calls[-1] == ("hf", "command")
    (report,) = json.loads((out / "report.json").read_text())["checkpoints"]
    assert report["short_document_loss"]["tokens"] == len(PROBE_TOKENS) - 1
    assert 0 < report["short_document_loss"]["loss"] < 20
    assert report["recall"]["cells"] == [] and report["position_loss"] == []
    assert "## Short-document loss" in (out / "report.md").read_text()


def test_nothing_to_measure_names_every_registered_measure(probe, monkeypatch, tmp_path, capsys):
    from engine.evaluate.__main__ import main
    monkeypatch.setattr(_Probe, "prepare", lambda self, request: None)
    random_hf_llama(tmp_path / "hf")
    assert main(["--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "out")]) == 2
    assert ("nothing to measure: give --lengths (recall), --long-documents (loss by position), "
            "--short-documents or --probe-seed (the probe)") in capsys.readouterr().err


def test_one_registry_drives_validation_inside_training(probe, tmp_path):
    plan = RunPlan.create(get_model_config("tiny", num_layers=2), ParallelLayout(),
                          seq_length=64, global_batch=1)
    section = EvalSection(final=True)
    validation = Validation.prepare(section, plan)
    assert [r.stage for r in probe.requests] == ["final"]
    assert probe.requests[0].names["position_length"] == "eval.position_length"
    files = validation.final_report([], "run", "runs/x/step_00000002", tmp_path / "eval")
    assert probe.calls == [("engine", "final")] and files
    (report,) = json.loads((tmp_path / "eval" / "report.json").read_text())["checkpoints"]
    assert report["short_document_loss"] == {"documents": 1, "tokens": 64, "loss": 0.5}


def test_measures_run_every_interval_log_their_values(probe, monkeypatch):
    """Every eval.interval steps the measures of the "interval" stage run (recall, which needs
    a tokenizer and a model of its vocabulary, is left out here) and log their values."""
    monkeypatch.setattr(Recall, "prepare", lambda self, request: None)
    plan = RunPlan.create(get_model_config("tiny", num_layers=2), ParallelLayout(),
                          seq_length=64, global_batch=1)
    validation = Validation.prepare(EvalSection(interval=2, lengths=[256]), plan)
    assert [r.stage for r in probe.requests] == ["interval"]
    assert validation.run([]) == {"probe": 0.5}
    assert probe.calls == [("engine", "interval")]


def test_depths_and_the_short_document_limit_are_defined_once():
    assert depths(EvalSection(depths=3)) == [0.0, 0.5, 1.0]
    assert depths(EvalSection(depths=[0.25, 1])) == [0.25, 1.0]
    for bad in ([], ["a"], [True], "3"):
        with pytest.raises(EvaluationError, match="eval.depths"):
            depths(EvalSection(depths=bad))
    assert short_limit(EvalSection()) == 4096
    assert short_limit(EvalSection(position_length=300)) == 300
    request = MeasureRequest(EvalSection(lengths=[256]))
    with pytest.raises(EvaluationError, match="--lengths needs --tokenizer"):
        registry.prepare_measures(request)


@dataclass
class _EchoExample:
    task: str
    length: int
    index: int
    input: str
    answer_prefix: str
    outputs: list
    tokens_to_generate: int
    prompt_tokens: int
    metric: str = "even_index"

    @property
    def prompt(self):
        return self.input + self.answer_prefix


class _Echo(GeneratedProtocol):
    """A protocol registered once: one task whose examples score 1 at even indices."""
    name, protocol, protocols, order, asked = "echo", "echo", ("echo",), 60, "--lengths (echo)"
    tasks = ("repeat",)

    def build(self, section, tokenizer, tasks):
        return [_EchoExample(task, length, index, f"Say {index}.", " Answer:", [str(index)], 2,
                             len(tokenizer.encode(f"Say {index}. Answer:")))
                for task in tasks for length in section.lengths
                for index in range(section.samples)], None

    def score(self, example, text):
        return text, 1.0 if example.index % 2 == 0 else 0.0


def test_a_protocol_measure_runs_through_the_common_pipeline(monkeypatch, tmp_path):
    """A protocol is one measure: registered, it is a --protocol with its tasks, its prompts
    are generated with on the model, and its part of the report reaches report.json, report.md
    and examples.jsonl (also without a model) through the one command."""
    from engine.evaluate.__main__ import _parser, main
    from tests.engine.evaluate_helpers import LLAMA3_VOCAB, llama3_tokenizer_dir, tiny_llama

    monkeypatch.setattr(registry, "_REGISTRY", [*registry.measures(None), _Echo()])
    assert [m.name for m in registry.measures("echo")] == ["echo"]
    assert registry.protocol_tasks()["echo"] == ("repeat",)
    assert "echo" in _parser().format_help()
    model = tmp_path / "tiny"
    tiny_llama(LLAMA3_VOCAB, seed=0, dtype="float32").save_pretrained(str(model))
    common = ["--protocol", "echo", "--tokenizer", llama3_tokenizer_dir(), "--lengths", "64",
              "--samples", "3", "--no-progress"]
    out = tmp_path / "out"
    assert main([*common, "--hf", str(model), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert {k: report[k] for k in ("protocol", "model", "exported_from_checkpoint", "seed")} == {
        "protocol": "echo", "model": str(model), "exported_from_checkpoint": False, "seed": 42}
    (cell,) = report["cells"]
    assert (cell["task"], cell["length"], cell["samples"]) == ("repeat", 64, 3)
    assert cell["score"] == pytest.approx(2 / 3) and cell["generation_budget"] == 2
    assert cell["ci_method"] == "wilson" and 0 < cell["ci95"][0] < 2 / 3 < cell["ci95"][1] < 1
    assert "| repeat | 64 | 66.7 |" in (out / "report.md").read_text()
    rows = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    assert [(r["protocol"], r["index"], r["score"]) for r in rows] == [
        ("echo", 0, 1.0), ("echo", 1, 0.0), ("echo", 2, 1.0)]
    assert all(isinstance(r["output"], str) for r in rows)
    # Without a model: the examples alone.
    assert main([*common, "--out", str(tmp_path / "only")]) == 0
    assert sorted(p.name for p in (tmp_path / "only").iterdir()) == ["examples.jsonl"]
    assert [r["index"] for r in map(json.loads, (tmp_path / "only" / "examples.jsonl")
                                    .read_text().splitlines())] == [0, 1, 2]
