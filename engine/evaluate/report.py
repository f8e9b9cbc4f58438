"""The evaluation report: report.json, report.md and PNG plots, several checkpoints side by side.

The input is plain data the engine side fills in:

    report = EvaluationReport(checkpoints=[
        CheckpointReport(name="stage1", checkpoint="runs/stage1/checkpoints/step_00001000",
                         scoring="teacher_forced",            # or "generation"
                         tokenizer=tokenizer.describe(), seed=0, haystack=haystack.describe(),
                         recall=recall_cells(results),        # [RecallCell] (scoring.py)
                         position_loss=buckets.buckets(),     # [PositionBucket] (position_loss.py)
                         short_document_loss=short.result()), # ShortDocumentLoss or None
        ...])
    paths = write_report(report, "eval/")     # {"report.json": path, "report.md": ..., PNGs}
    report = read_report("eval/report.json")  # back to the dataclasses (to add a checkpoint)

Files (written into a folder beside ``out_dir`` and published as a whole, replacing the
previous report: ``out_dir`` holds one report or the other, never a mix, and no plot of a task
the new report lacks; ``check_report_folder`` says beforehand whether ``out_dir`` can take it):
- report.json: {"schema_version": 1, "checkpoints": [{"name", "checkpoint", "scoring",
  "tokenizer", "seed", "haystack", "recall": {"cells": [{"task", "length", "depth", "examples",
  "score", "answer_loss"}], "by_task_length": [{"task", "length", "examples", "score"}],
  "by_task": [{"task", "examples", "score"}], "average"}, "position_loss": [{"start", "end",
  "tokens", "loss"}], "short_document_loss": {"documents", "tokens", "loss"} or null}]}.
  Scores are RULER's metric in [0, 1]; by_task_length and by_task weight examples equally,
  "average" weighs tasks equally; losses are nats.
- report.md: the same as tables.
- A protocol's report (--protocol ruler | helmet-recall: a ``CheckpointReport`` whose
  ``protocol`` is a ``ProtocolResult``, one model): report.json is {"protocol", "model" (its
  path as given), "exported_from_checkpoint", "seed", "cells": [{"task", "length", "samples",
  "score", "ci95", "ci_method", "metric", "scoring": "generated", "generation_budget"}]}
  (``protocol_cells``), report.md their table, no plots.
- recall_heatmap_TASK.png (one panel per checkpoint: depth against length),
  recall_vs_length.png (one panel per task, plus the average over the tasks a checkpoint was
  evaluated on when there are several; a line per checkpoint, one color per checkpoint in
  every plot), loss_vs_position.png (a line per checkpoint; a second panel with the
  short-document loss when there is one). Each panel is PANEL_INCHES at DPI, so an image is
  columns x rows panels in size; up to MAX_COLUMNS panels a row.
matplotlib is imported (Agg canvas, no pyplot state) only when plots are written.
"""
from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np

from data_tools.outputs import OutputError, check_output_location
from engine.evaluate.errors import EvaluationError
from engine.evaluate.position_loss import PositionBucket, ShortDocumentLoss
from engine.evaluate.scoring import RecallCell
from engine.evaluate.statistics import confidence_interval
from publishing.atomic import staged_directory

SCHEMA_VERSION = 1
SCORING_MODES = ("teacher_forced", "generation")
PANEL_INCHES = (4.0, 3.2)
DPI = 100
MAX_COLUMNS = 4


@dataclass
class ProtocolResult:
    """A published protocol's scores on one model (--protocol ruler | helmet-recall)."""
    protocol: str
    seed: int
    cells: list[dict]  # protocol_cells


@dataclass
class CheckpointReport:
    """Everything measured on one checkpoint (see the module docstring)."""
    name: str
    checkpoint: str
    scoring: str
    tokenizer: dict = field(default_factory=dict)
    seed: Optional[int] = None
    haystack: Optional[dict] = None
    recall: list[RecallCell] = field(default_factory=list)
    position_loss: list[PositionBucket] = field(default_factory=list)
    short_document_loss: Optional[ShortDocumentLoss] = None
    protocol: Optional[ProtocolResult] = None
    exported_from_checkpoint: bool = False  # generated with a temporary export of an engine one


@dataclass
class EvaluationReport:
    checkpoints: list[CheckpointReport]


def _check(report: EvaluationReport) -> None:
    names = [c.name for c in report.checkpoints]
    if not names:
        raise EvaluationError("a report needs at least one checkpoint")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise EvaluationError(f"checkpoint name {duplicates[0]!r} appears twice in the report; "
                              f"give each checkpoint its own name")
    for c in report.checkpoints:
        if c.scoring not in SCORING_MODES:
            raise EvaluationError(f"checkpoint {c.name!r}: scoring {c.scoring!r}; use one of "
                                  f"{', '.join(SCORING_MODES)}")


def _mean_by(cells: list[RecallCell], key: Callable) -> list[tuple]:
    groups = defaultdict(lambda: [0, 0.0])
    for cell in cells:
        group = groups[key(cell)]
        group[0] += cell.examples
        group[1] += cell.score * cell.examples
    return [(k, n, total / n if n else 0.0) for k, (n, total) in sorted(groups.items())]


def interval_fields(scores: Optional[list[float]]) -> dict:
    """{"ci95": [low, high], "ci_method"} of per-example scores (engine.evaluate.statistics:
    Wilson for exact-match scores, bootstrap otherwise); nulls when they are not known."""
    if not scores:
        return {"ci95": None, "ci_method": None}
    interval = confidence_interval(scores)
    return {"ci95": [interval.low, interval.high], "ci_method": interval.method}


def _pooled_scores(cells: list[RecallCell]) -> Optional[list[float]]:
    if any(c.scores is None for c in cells):
        return None
    return [s for c in cells for s in c.scores]


def recall_summary(cells: list[RecallCell]) -> dict:
    """by_task_length (with 95% intervals), by_task (example-weighted) and the average over
    tasks."""
    by_task_length = [{"task": t, "length": length_, "examples": n, "score": s,
                       **interval_fields(_pooled_scores(
                           [c for c in cells if (c.task, c.length) == (t, length_)]))}
                      for (t, length_), n, s in _mean_by(cells, lambda c: (c.task, c.length))]
    by_task = [{"task": t, "examples": n, "score": s} for t, n, s in _mean_by(cells, lambda c: c.task)]
    average = sum(t["score"] for t in by_task) / len(by_task) if by_task else None
    return {"cells": [{**asdict(c), **interval_fields(c.scores)} for c in cells],
            "by_task_length": by_task_length,
            "by_task": by_task, "average": average}


def protocol_cells(examples: list[dict]) -> list[dict]:
    """A protocol's cells from its scored examples ({"task", "length", "metric",
    "tokens_to_generate", "score"}): per (task, length) the mean score, its 95% interval, the
    metric and the generation budget."""
    cells: dict[tuple, list] = {}
    for example in examples:
        cells.setdefault((example["task"], example["length"]), []).append(example)
    report = []
    for (task, length), members in cells.items():
        interval = confidence_interval([m["score"] for m in members])
        report.append({"task": task, "length": length, "samples": len(members),
                       "score": interval.mean, "ci95": [interval.low, interval.high],
                       "ci_method": interval.method, "metric": members[0]["metric"],
                       "scoring": "generated",
                       "generation_budget": members[0]["tokens_to_generate"]})
    return report


def _protocol_report(report: EvaluationReport) -> Optional[CheckpointReport]:
    """The one model of a protocol's report, None for this suite's report."""
    with_protocol = [c for c in report.checkpoints if c.protocol is not None]
    if not with_protocol:
        return None
    if len(report.checkpoints) != 1:
        raise EvaluationError(f"a {with_protocol[0].protocol.protocol} report holds one model, "
                              f"got {len(report.checkpoints)}: evaluate each on its own")
    return with_protocol[0]


def report_to_dict(report: EvaluationReport) -> dict:
    _check(report)
    single = _protocol_report(report)
    if single is not None:
        return {"protocol": single.protocol.protocol, "model": single.checkpoint,
                "exported_from_checkpoint": single.exported_from_checkpoint,
                "seed": single.protocol.seed, "cells": single.protocol.cells}
    checkpoints = []
    for c in report.checkpoints:
        checkpoints.append({
            "name": c.name, "checkpoint": c.checkpoint, "scoring": c.scoring,
            "scoring_note": SCORING_NOTES.get(c.scoring),
            "tokenizer": c.tokenizer, "seed": c.seed, "haystack": c.haystack,
            "recall": recall_summary(c.recall),
            "position_loss": [asdict(b) for b in c.position_loss],
            "short_document_loss": asdict(c.short_document_loss) if c.short_document_loss else None})
    return {"schema_version": SCHEMA_VERSION, "checkpoints": checkpoints}


def report_from_dict(data: dict) -> EvaluationReport:
    if data.get("schema_version") != SCHEMA_VERSION:
        raise EvaluationError(f"report schema_version {data.get('schema_version')!r}; this "
                              f"engine reads version {SCHEMA_VERSION}: evaluate again")
    checkpoints = []
    for c in data["checkpoints"]:
        short = c.get("short_document_loss")
        checkpoints.append(CheckpointReport(
            c["name"], c["checkpoint"], c["scoring"], c.get("tokenizer") or {}, c.get("seed"),
            c.get("haystack"), [RecallCell(**{k: v for k, v in cell.items()
                                              if k not in ("ci95", "ci_method")})
                                for cell in c["recall"]["cells"]],
            [PositionBucket(**b) for b in c.get("position_loss", [])],
            ShortDocumentLoss(**short) if short else None))
    return EvaluationReport(checkpoints)


def read_report(path: str) -> EvaluationReport:
    """A report.json back as an EvaluationReport (e.g. to add a checkpoint and write again)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise EvaluationError(f"cannot read report {path!r}: {error}; give a report.json "
                              f"written by the evaluation") from None
    return report_from_dict(data)


def tokens_label(tokens: int) -> str:
    """1024 -> "1K", 524288 -> "512K", 1048576 -> "1M", other counts as they are."""
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if tokens >= size and tokens % size == 0:
            return f"{tokens // size}{unit}"
    return str(tokens)


def _percent(score: Optional[float]) -> str:
    return "-" if score is None else f"{100 * score:.1f}"


def _loss(loss: Optional[float]) -> str:
    return "-" if loss is None else f"{loss:.4f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _with_interval(row: Optional[dict]) -> str:
    if row is None:
        return "-"
    if not row.get("ci95"):
        return _percent(row["score"])
    low, high = row["ci95"]
    return f"{_percent(row['score'])} [{100 * low:.1f}, {100 * high:.1f}]"


# How each scoring mode reads a cell: what was run and the generation budget.
SCORING_NOTES = {
    "teacher_forced": "teacher-forced: the canonical answer is fed in one forward pass and a "
                      "value counts when every one of its tokens is the argmax (a lower bound "
                      "on greedy generation; no generation budget)",
    "generation": "generated: greedy decoding of up to the answer's tokens + 16, scored on the "
                  "text",
}


def _scoring_note(report: EvaluationReport) -> str:
    return "Scoring per checkpoint: " + "; ".join(
        f"{c.name}: {SCORING_NOTES[c.scoring]}" for c in report.checkpoints) + "."


def _protocol_markdown(result: ProtocolResult) -> str:
    lines = [f"# Recall (protocol: {result.protocol})", "",
             "| task | length | score | 95% CI | samples | scoring | budget |",
             "|---|---|---|---|---|---|---|"]
    for c in result.cells:
        lines.append(f"| {c['task']} | {c['length']} | {100 * c['score']:.1f} | "
                     f"[{100 * c['ci95'][0]:.1f}, {100 * c['ci95'][1]:.1f}] ({c['ci_method']}) | "
                     f"{c['samples']} | {c['scoring']} | {c['generation_budget']} |")
    return "\n".join(lines) + "\n"


def render_markdown(report: EvaluationReport) -> str:
    _check(report)
    single = _protocol_report(report)
    if single is not None:
        return _protocol_markdown(single.protocol)
    names = [c.name for c in report.checkpoints]
    lines = ["# Long-context evaluation", ""]
    lines += _table(["checkpoint", "path", "scoring", "seed", "tokenizer", "haystack"], [
        [c.name, f"`{c.checkpoint}`", c.scoring.replace("_", "-"), str(c.seed),
         f"`{c.tokenizer.get('path', '-')}`", str((c.haystack or {}).get("kind", "-"))]
        for c in report.checkpoints])
    summaries = {c.name: recall_summary(c.recall) for c in report.checkpoints}
    keys = sorted({(r["task"], r["length"]) for s in summaries.values() for r in s["by_task_length"]})
    if keys:
        lines += ["", "## Recall", "",
                  "RULER's metric: % of gold values found, mean over depths, with its 95% "
                  "confidence interval (Wilson for exact-match scores, bootstrap otherwise). "
                  + _scoring_note(report), ""]
        score = {(name, r["task"], r["length"]): r
                 for name, s in summaries.items() for r in s["by_task_length"]}
        rows = [[task, tokens_label(length)] + [_with_interval(score.get((n, task, length)))
                                                for n in names]
                for task, length in keys]
        averages = [_percent(summaries[n]["average"]) for n in names]
        lines += _table(["task", "length"] + names, rows + [["**average over tasks**", ""] + averages])
        lines += ["", "### Recall by depth", ""]
        for task in sorted({t for t, _ in keys}):
            for c in report.checkpoints:
                cells = [x for x in c.recall if x.task == task]
                if not cells:
                    continue
                lengths = sorted({x.length for x in cells})
                by_cell = {(x.depth, x.length): x.score for x in cells}
                lines += [f"{task}, {c.name} (rows: depth, columns: length)", ""]
                lines += _table(["depth"] + [tokens_label(length_) for length_ in lengths], [
                    [f"{depth:.2f}"] + [_percent(by_cell.get((depth, length_))) for length_ in lengths]
                    for depth in sorted({x.depth for x in cells})])
                lines.append("")
    buckets = sorted({(b.start, b.end) for c in report.checkpoints for b in c.position_loss})
    if buckets:
        lines += ["", "## Loss by position", "",
                  "Mean next-token loss (nats) of long held-out documents at positions [start, end).", ""]
        loss = {(c.name, b.start, b.end): b for c in report.checkpoints for b in c.position_loss}
        rows = []
        for start, end in buckets:
            row = [f"[{tokens_label(start)}, {tokens_label(end)})"]
            for n in names:
                b = loss.get((n, start, end))
                row += [_loss(b.loss) if b else "-", str(b.tokens) if b else "-"]
            rows.append(row)
        lines += _table(["positions"] + [h for n in names for h in (n, f"{n} tokens")], rows)
    shorts = [(c.name, c.short_document_loss) for c in report.checkpoints if c.short_document_loss]
    if shorts:
        lines += ["", "## Short-document loss", "",
                  "Token-weighted mean loss (nats) of short held-out documents.", ""]
        lines += _table(["checkpoint", "documents", "tokens", "loss"],
                        [[n, str(s.documents), str(s.tokens), _loss(s.loss)] for n, s in shorts])
    return "\n".join(lines).rstrip() + "\n"


# Plots


def _figure(panels: int):
    """(figure, axes list) of `panels` panels, MAX_COLUMNS a row, each PANEL_INCHES."""
    from matplotlib.figure import Figure

    columns = min(panels, MAX_COLUMNS)
    rows = math.ceil(panels / columns)
    figure = Figure(figsize=(PANEL_INCHES[0] * columns, PANEL_INCHES[1] * rows), dpi=DPI,
                    layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False)
    axes = [grid[r][c] for r in range(rows) for c in range(columns)]
    for extra in axes[panels:]:
        extra.set_visible(False)
    return figure, axes[:panels]


def _save_png(figure, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    figure.savefig(path, format="png", dpi=DPI)


def _log2_length_axis(axis, lengths) -> None:
    axis.set_xscale("log", base=2)
    axis.set_xticks(lengths)
    axis.set_xticklabels([tokens_label(length_) for length_ in lengths], fontsize=7)
    axis.minorticks_off()


def _heatmap(report: EvaluationReport, task: str):
    figure, axes = _figure(len(report.checkpoints))
    cells = [x for c in report.checkpoints for x in c.recall if x.task == task]
    lengths = sorted({x.length for x in cells})
    depths = sorted({x.depth for x in cells})
    image = None
    for axis, c in zip(axes, report.checkpoints):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for x in c.recall:
            if x.task == task:
                grid[depths.index(x.depth), lengths.index(x.length)] = x.score
        image = axis.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto",
                            origin="upper", interpolation="nearest")
        if grid.size <= 144:  # small enough to print each cell's score
            for (row, column), score in np.ndenumerate(grid):
                if not np.isnan(score):
                    axis.text(column, row, f"{100 * score:.0f}", ha="center", va="center", fontsize=7)
        axis.set_xticks(range(len(lengths)))
        axis.set_xticklabels([tokens_label(length_) for length_ in lengths], fontsize=7)
        axis.set_yticks(range(len(depths)))
        axis.set_yticklabels([f"{100 * d:.0f}%" for d in depths], fontsize=7)
        axis.set_xlabel("length (tokens)", fontsize=8)
        axis.set_ylabel("depth", fontsize=8)
        axis.set_title(f"{task}: {c.name}", fontsize=9)
        if np.isnan(grid).all():
            axis.text(0.5, 0.5, "not evaluated", transform=axis.transAxes, ha="center", fontsize=9)
    figure.colorbar(image, ax=axes, shrink=0.8, label="recall")
    return figure


def _recall_by_length(report: EvaluationReport, tasks: list[str]):
    summaries = [recall_summary(c.recall) for c in report.checkpoints]
    panels = tasks + (["average over tasks"] if len(tasks) > 1 else [])
    figure, axes = _figure(len(panels))
    for axis, panel in zip(axes, panels):
        for number, (c, summary) in enumerate(zip(report.checkpoints, summaries)):
            rows = summary["by_task_length"]
            if panel in tasks:
                points = [(r["length"], r["score"]) for r in rows if r["task"] == panel]
            else:  # each task weighs the same at each length
                by_length = defaultdict(list)
                for r in rows:
                    by_length[r["length"]].append(r["score"])
                points = [(length_, sum(s) / len(s)) for length_, s in sorted(by_length.items())]
            if points:  # one color per checkpoint in every panel
                axis.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                          label=c.name, color=f"C{number}")
        lengths = sorted({r["length"] for s in summaries for r in s["by_task_length"]})
        _log2_length_axis(axis, lengths)
        axis.set_ylim(-0.02, 1.02)
        axis.set_title(panel, fontsize=9)
        axis.set_xlabel("length (tokens)", fontsize=8)
        axis.set_ylabel("recall", fontsize=8)
        axis.legend(fontsize=7)
    return figure


def _loss_by_position(report: EvaluationReport):
    shorts = [(c.name, c.short_document_loss.loss) for c in report.checkpoints
              if c.short_document_loss and c.short_document_loss.loss is not None]
    figure, axes = _figure(2 if shorts else 1)
    axis = axes[0]
    ends = set()
    for number, c in enumerate(report.checkpoints):
        points = [(b.end, b.loss) for b in c.position_loss if b.loss is not None]
        ends.update(p[0] for p in points)
        if points:
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=c.name,
                      color=f"C{number}")
    _log2_length_axis(axis, sorted(ends))
    axis.set_title("loss by position (long documents)", fontsize=9)
    axis.set_xlabel("bucket end (tokens of context)", fontsize=8)
    axis.set_ylabel("mean loss (nats)", fontsize=8)
    axis.legend(fontsize=7)
    if shorts:
        colors = {c.name: f"C{number}" for number, c in enumerate(report.checkpoints)}
        axes[1].bar([n for n, _ in shorts], [length_ for _, length_ in shorts],
                    color=[colors[n] for n, _ in shorts])
        axes[1].set_title("short-document loss", fontsize=9)
        axes[1].set_ylabel("mean loss (nats)", fontsize=8)
        axes[1].tick_params(axis="x", labelsize=7)
    return figure


REPORT_FILES = ("report.json", "report.md", "recall_vs_length.png", "loss_vs_position.png",
                "examples.jsonl")
HEATMAP_PREFIX = "recall_heatmap_"


def _is_report_file(name: str) -> bool:
    return name in REPORT_FILES or name.startswith(HEATMAP_PREFIX) and name.endswith(".png")


def check_report_folder(out_dir: str, option: str = "--out") -> None:
    """Raise EvaluationError unless a report can be published at ``out_dir``: a new folder
    whose parents are writable folders, or a folder holding only an earlier report (which the
    new one replaces as a whole, so anything else there would be lost). Writes nothing."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise EvaluationError(f"{option} {out_dir} is a file, where the report folder would be "
                              f"written: choose another {option} or remove the file")
    if os.path.isdir(out_dir):
        for name in sorted(os.listdir(out_dir)):
            entry = os.path.join(out_dir, name)
            if not _is_report_file(name) or os.path.isdir(entry):
                raise EvaluationError(
                    f"{option} {out_dir} holds {name}{' (a folder)' if os.path.isdir(entry) else ''}"
                    f", which is not part of an evaluation report: the report replaces the "
                    f"folder as a whole; choose a new {option} or move {name} out")
    try:
        check_output_location(out_dir, option)
    except OutputError as error:
        raise EvaluationError(str(error)) from None


def write_report(report: EvaluationReport, out_dir: str,
                 extra_files: Optional[dict[str, str]] = None) -> dict[str, str]:
    """Write report.json, report.md, the PNGs and ``extra_files`` ({name in REPORT_FILES: text},
    e.g. examples.jsonl) into `out_dir` (see the module docstring: published together,
    replacing an earlier report there). Returns {file name: path}."""
    data = report_to_dict(report)  # checks the report before anything is written
    markdown = render_markdown(report)
    check_report_folder(out_dir)
    figures = {}
    tasks = sorted({x.task for c in report.checkpoints for x in c.recall})
    for task in tasks:
        figures[f"{HEATMAP_PREFIX}{task}.png"] = lambda task=task: _heatmap(report, task)
    if tasks:
        figures["recall_vs_length.png"] = lambda: _recall_by_length(report, tasks)
    if any(c.position_loss for c in report.checkpoints):
        figures["loss_vs_position.png"] = lambda: _loss_by_position(report)
    final = os.path.abspath(out_dir)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    with staged_directory(final) as staging:
        for name, build in figures.items():
            _save_png(build(), os.path.join(staging, name))
        with open(os.path.join(staging, "report.md"), "w", encoding="utf-8") as f:
            f.write(markdown)
        with open(os.path.join(staging, "report.json"), "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=2) + "\n")
        write_text_files(staging, extra_files or {})
    return {name: os.path.join(out_dir, name)
            for name in [*figures, "report.md", "report.json", *(extra_files or {})]}


def write_text_files(folder: str, files: dict[str, str]) -> None:
    for name, text in files.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(text)


def publish_text_report(out_dir: str, files: dict[str, str]) -> None:
    """Publish ``files`` ({name in REPORT_FILES: text}) as the report folder ``out_dir``, whole,
    replacing an earlier report there (check_report_folder first)."""
    check_report_folder(out_dir)
    final = os.path.abspath(out_dir)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    with staged_directory(final) as staging:
        write_text_files(staging, files)
