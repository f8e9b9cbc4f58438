"""Loss by position and the report: buckets, accumulation, report.json / report.md / PNGs for
several checkpoints side by side, atomic writes, and bad input."""
import json
import os
import struct

import numpy as np
import pytest

from engine.evaluate import (CheckpointReport, EvaluationError, EvaluationReport, ExampleResult,
                             MeanLossAccumulator, PositionLossAccumulator, position_bucket_edges,
                             read_report, recall_cells, render_markdown, write_report)
from engine.evaluate import report as report_module
from engine.evaluate.statistics import confidence_interval

PANEL_PIXELS = (int(report_module.PANEL_INCHES[0] * report_module.DPI),
                int(report_module.PANEL_INCHES[1] * report_module.DPI))


def test_position_bucket_edges_double_up_to_the_length():
    assert position_bucket_edges(65536).tolist() == [0, 64, 128, 256, 512, 1024, 2048, 4096, 8192,
                                                     16384, 32768, 65536]
    assert position_bucket_edges(1000).tolist() == [0, 64, 128, 256, 512, 1000]
    assert position_bucket_edges(50).tolist() == [0, 50]
    assert position_bucket_edges(8, first_bucket_end=1).tolist() == [0, 1, 2, 4, 8]
    with pytest.raises(EvaluationError, match="seq_length 0"):
        position_bucket_edges(0)


def test_position_losses_accumulate_per_bucket_in_any_split():
    length = 1000
    rng = np.random.default_rng(0)
    documents = [rng.uniform(0, 10, length) for _ in range(3)]
    whole = PositionLossAccumulator(length)
    for losses in documents:
        whole.add(losses)
    expected_tokens = [64, 64, 128, 256, 488]
    assert whole.tokens.tolist() == [3 * t for t in expected_tokens]
    edges = [0, 64, 128, 256, 512, 1000]
    for b, bucket in enumerate(whole.buckets()):
        values = np.concatenate([d[edges[b]:edges[b + 1]] for d in documents])
        assert (bucket.start, bucket.end, bucket.tokens) == (edges[b], edges[b + 1], len(values))
        assert bucket.loss == pytest.approx(values.mean(), rel=1e-12)
    # Context parallelism: each rank holds chunks r and 2CP-1-r and its global positions.
    chunks = np.array_split(np.arange(length), 4)
    ranks = [np.concatenate([chunks[0], chunks[3]]), np.concatenate([chunks[1], chunks[2]])]
    shares = [PositionLossAccumulator(length) for _ in ranks]
    for losses in documents:
        for share, positions in zip(shares, ranks):
            share.add(losses[positions], positions=positions)
    reduced = PositionLossAccumulator.from_totals(length, shares[0].tokens + shares[1].tokens,
                                                  shares[0].loss_sum + shares[1].loss_sum)
    assert reduced.tokens.tolist() == whole.tokens.tolist()
    np.testing.assert_allclose(reduced.loss_sum, whole.loss_sum, rtol=1e-12)
    shares[0].merge(shares[1])
    np.testing.assert_allclose(shares[0].loss_sum, whole.loss_sum, rtol=1e-12)
    # A mask leaves tokens out; empty buckets have no loss.
    masked = PositionLossAccumulator(length)
    masked.add(documents[0], mask=np.arange(length) < 100)
    assert masked.tokens.tolist() == [64, 36, 0, 0, 0]
    assert masked.buckets()[2].loss is None
    with pytest.raises(EvaluationError, match=r"position 1000 outside \[0, 1000\)"):
        masked.add([1.0], positions=[1000])
    with pytest.raises(EvaluationError, match="3 token counts and 3 loss sums for 5 buckets"):
        PositionLossAccumulator.from_totals(length, [1, 2, 3], [1.0, 2.0, 3.0])


def test_short_document_loss_is_token_weighted():
    short = MeanLossAccumulator()
    short.add([1.0, 2.0, 3.0])
    short.add([10.0, 0.0], mask=[1, 0])
    result = short.result()
    assert (result.documents, result.tokens) == (2, 4) and result.loss == pytest.approx(4.0)
    assert MeanLossAccumulator().result().loss is None


def png_size(path):
    with open(path, "rb") as f:
        header = f.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR"
    return struct.unpack(">II", header[16:24])


def _checkpoint(name, quality, tasks=("niah_single", "json_kv"), with_short=True):
    """A checkpoint's measurements, as the engine side fills them in."""
    rng = np.random.default_rng(len(name))
    results = []
    for task in tasks:
        for length in (1024, 4096):
            for depth in (0.0, 0.5, 1.0):
                for index in range(2):
                    found = rng.random() < quality * (1.2 - depth * 0.3) * (1024 / length) ** 0.1
                    results.append(ExampleResult(task, length, depth, index, (bool(found),), 1.5))
    buckets = PositionLossAccumulator(4096)
    buckets.add(np.linspace(4.0, 2.0 - quality, 4095))
    short = MeanLossAccumulator()
    if with_short:
        short.add(np.full(100, 3.0 - quality))
    return CheckpointReport(name, f"runs/{name}/checkpoints/step_00000010", "teacher_forced",
                            {"kind": "tiktoken", "path": "tokenizer.model", "vocab_size": 128256},
                            0, {"kind": "noise"}, recall_cells(results), buckets.buckets(),
                            short.result() if with_short else None), results


def test_report_writes_every_file_for_checkpoints_side_by_side(tmp_path):
    checkpoints = [_checkpoint("base", 0.2), _checkpoint("stage1", 0.5),
                   _checkpoint("stage2", 0.9, with_short=False)]
    report = EvaluationReport([c for c, _ in checkpoints])
    out = tmp_path / "eval"
    written = write_report(report, str(out))
    names = {"report.json", "report.md", "recall_heatmap_json_kv.png",
             "recall_heatmap_niah_single.png", "recall_vs_length.png", "loss_vs_position.png"}
    assert set(written) == names and set(os.listdir(out)) == names  # no temporary file left
    data = json.loads((out / "report.json").read_text())
    assert data["schema_version"] == 1 and [c["name"] for c in data["checkpoints"]] == [
        "base", "stage1", "stage2"]
    for entry, (checkpoint, results) in zip(data["checkpoints"], checkpoints):
        assert set(entry) == {"name", "checkpoint", "scoring", "scoring_note", "tokenizer", "seed",
                              "haystack", "recall", "position_loss", "short_document_loss"}
        assert entry["scoring_note"].startswith("teacher-forced")
        assert entry["scoring"] == "teacher_forced" and entry["seed"] == 0
        assert entry["tokenizer"]["vocab_size"] == 128256
        recall = entry["recall"]
        assert set(recall) == {"cells", "by_task_length", "by_task", "average"}
        assert len(recall["cells"]) == 2 * 2 * 3 and set(recall["cells"][0]) == {
            "task", "length", "depth", "examples", "score", "answer_loss", "scores", "ci95",
            "ci_method"}
        for row in recall["by_task_length"]:
            members = [r.score for r in results if (r.task, r.length) == (row["task"], row["length"])]
            assert row["examples"] == len(members) == 6
            assert row["score"] == pytest.approx(np.mean(members))
            interval = confidence_interval(members)
            assert row["ci95"] == pytest.approx([interval.low, interval.high])
            assert row["ci_method"] == interval.method
        by_task = {r["task"]: r["score"] for r in recall["by_task"]}
        for task, score in by_task.items():
            assert score == pytest.approx(np.mean([r.score for r in results if r.task == task]))
        assert recall["average"] == pytest.approx(np.mean(list(by_task.values())))
        assert [(b["start"], b["end"]) for b in entry["position_loss"]][-1] == (2048, 4096)
        assert sum(b["tokens"] for b in entry["position_loss"]) == 4095
    assert data["checkpoints"][2]["short_document_loss"] is None
    assert data["checkpoints"][1]["short_document_loss"] == {"documents": 1, "tokens": 100,
                                                            "loss": pytest.approx(2.5)}
    # report.md: the same numbers as tables, checkpoints side by side.
    markdown = (out / "report.md").read_text()
    stage1_1k = next(r for r in data["checkpoints"][1]["recall"]["by_task_length"]
                     if (r["task"], r["length"]) == ("niah_single", 1024))
    assert "| task | length | base | stage1 | stage2 |" in markdown
    assert "| niah_single | 1K | " in markdown and (
        f"{100 * stage1_1k['score']:.1f} [{100 * stage1_1k['ci95'][0]:.1f}, "
        f"{100 * stage1_1k['ci95'][1]:.1f}]") in markdown
    assert "teacher-forced: the canonical answer is fed" in markdown
    assert "niah_single, stage2 (rows: depth, columns: length)" in markdown
    assert "| [2K, 4K) |" in markdown and "| stage1 | 1 | 100 | 2.5000 |" in markdown
    assert markdown == render_markdown(report)
    # PNGs: one panel per checkpoint (heat maps), per task plus the average (recall), loss by
    # position plus short-document loss.
    width, height = PANEL_PIXELS
    assert png_size(out / "recall_heatmap_niah_single.png") == (3 * width, height)
    assert png_size(out / "recall_vs_length.png") == (3 * width, height)
    assert png_size(out / "loss_vs_position.png") == (2 * width, height)
    import matplotlib.image

    pixels = matplotlib.image.imread(str(out / "recall_heatmap_json_kv.png"))
    assert pixels.std() > 0.05  # something was drawn
    # The report reads back, and a checkpoint added later sits beside the others.
    again = read_report(str(out / "report.json"))
    assert again == report
    again.checkpoints.append(_checkpoint("stage3", 0.95, tasks=TASKS_FIVE)[0])
    written = write_report(again, str(out))
    assert png_size(out / "recall_heatmap_niah_single.png") == (4 * width, height)
    # five tasks + average = 6 panels, four a row
    assert png_size(out / "recall_vs_length.png") == (4 * width, 2 * height)
    assert len(written) == 4 + 5


TASKS_FIVE = ("niah_single", "niah_multikey", "niah_multivalue", "json_kv", "variable_tracking")


def test_bad_reports_write_nothing(tmp_path, monkeypatch):
    base, _ = _checkpoint("base", 0.5)
    with pytest.raises(EvaluationError, match="checkpoint name 'base' appears twice"):
        write_report(EvaluationReport([base, base]), str(tmp_path / "a"))
    wrong = CheckpointReport("x", "ckpt", "greedy")
    with pytest.raises(EvaluationError, match="scoring 'greedy'; use one of teacher_forced, "
                                              "generation"):
        write_report(EvaluationReport([wrong]), str(tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # A failure while plotting leaves no report.json and no temporary file.
    out = tmp_path / "c"
    calls, save_png = [], report_module._save_png

    def failing_save(figure, path):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"half")
            raise OSError("disk full")
        save_png(figure, path)

    monkeypatch.setattr(report_module, "_save_png", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_report(EvaluationReport([base]), str(out))
    # Nothing is published, and the staging folder beside it is gone.
    assert os.listdir(tmp_path) == []
    with pytest.raises(EvaluationError, match="cannot read report"):
        read_report(str(out / "report.json"))


def test_a_rewritten_report_replaces_the_old_one_whole(tmp_path, monkeypatch):
    """A reused folder ends with the new report only (no heat map of a task it lacks); a write
    that fails part-way leaves the previous report exactly as it was."""
    out = tmp_path / "eval"
    first, _ = _checkpoint("base", 0.5)
    write_report(EvaluationReport([first]), str(out))
    assert "recall_heatmap_json_kv.png" in os.listdir(out)
    fewer, _ = _checkpoint("base", 0.7, tasks=("niah_single",))
    written = write_report(EvaluationReport([fewer]), str(out))
    assert sorted(os.listdir(out)) == sorted(written) and \
        "recall_heatmap_json_kv.png" not in os.listdir(out)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    save_png, calls = report_module._save_png, []

    def dying_save(figure, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill would stop it: between two plots
        save_png(figure, path)

    monkeypatch.setattr(report_module, "_save_png", dying_save)
    with pytest.raises(KeyboardInterrupt):
        write_report(EvaluationReport([first]), str(out))
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["eval"]


@pytest.mark.parametrize("make, out_name, message", [
    (lambda root: (root / "eval" / "report.json").mkdir(parents=True), "eval",
     "holds report.json (a folder), which is not part of an evaluation report"),
    (lambda root: (root / "eval").write_text("x"), "eval", "eval is a file, where the report"),
    (lambda root: (root / "file").write_text("x"), "file/eval", "is a file, not a folder"),
    (lambda root: (root / "eval").mkdir() or (root / "eval" / "notes.txt").write_text("x"),
     "eval", "holds notes.txt, which is not part of an evaluation report"),
    (lambda root: (root / "read_only").mkdir(), "read_only/eval",
     "cannot create files in {root}/read_only: it is on a read-only file system"),
])
def test_an_unusable_report_folder_is_refused_before_anything_is_written(
        make, out_name, message, tmp_path, monkeypatch):
    import errno
    import tempfile

    from data_tools import outputs
    make(tmp_path)
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):  # root ignores mode bits; a read-only mount not
        if dir is not None and os.path.basename(dir) == "read_only":
            raise OSError(errno.EROFS, "Read-only file system")
        return real_mkstemp(*args, dir=dir, **kwargs)
    monkeypatch.setattr(outputs.tempfile, "mkstemp", mkstemp)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    base, _ = _checkpoint("base", 0.5)
    with pytest.raises(EvaluationError) as info:
        report_module.check_report_folder(str(tmp_path / out_name))
    assert message.replace("{root}", str(tmp_path)) in str(info.value)
    with pytest.raises(EvaluationError):
        write_report(EvaluationReport([base]), str(tmp_path / out_name))
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
