"""The TINY=1 recipe on one host, script after script as a user runs it (01-03 in the
tiny_work fixture, then 04 -> 08): every stage starts from the previous one with the published
schedule and RoPE base, the export carries the trained model, and the evaluation reports every
stage and the export side by side."""
import json
import math
import socket

import numpy as np
import pytest
from safetensors.torch import load_file

from data_tools.indexed import IndexedReader
from engine.checkpoint import latest_checkpoint, read_checkpoint_state
from engine.convert.export import TOKENIZER_FILES
from tests.distributed import free_port, run_command
from tests.examples.conftest import read_metrics
from tests.examples.system import recipe_env

PROLONG = "examples/prolong"
STEPS = 4  # TINY=1 (examples/prolong/tiny/train.yaml)
MIN_LR_RATIO = 0.1  # every stage config's optimizer.min_lr_ratio
POSITION_LENGTH, MAX_DOCUMENTS = 512, 8  # 08's TINY=1 EVAL_POSITION_LENGTH; eval.max_documents
SHORT_LIMIT, MAX_SHORT_DOCUMENTS = 512, 64  # shorter than the position length; its default


def scheduled_lr(lr: float, step: int) -> float:
    """The lr step ``step`` (1-based) trains at over STEPS steps: ceil(4 x 0.1) = ceil(4 x 0.05)
    = 1 warm-up step (step 1 at lr), then the cosine to lr x min_lr_ratio at the end of the run
    (step k trains after k - 1 scheduler steps)."""
    min_lr = lr * MIN_LR_RATIO
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (step - 1) / STEPS))


def expected_position_tokens(prefix) -> list[tuple[int, int, int]]:
    """(start, end, tokens) of the loss-by-position buckets over the first POSITION_LENGTH
    tokens of the first MAX_DOCUMENTS documents at least that long: positions 0..510 (the last
    token predicts nothing) in [0, 64), [64, 128), [128, 256), [256, 512)."""
    lengths = IndexedReader(str(prefix)).lengths
    documents = min(int((lengths >= POSITION_LENGTH).sum()), MAX_DOCUMENTS)
    edges = [0, 64, 128, 256, POSITION_LENGTH]
    return [(start, end, documents * (min(end, POSITION_LENGTH - 1) - start))
            for start, end in zip(edges, edges[1:])]


def expected_short_tokens(prefix) -> tuple[int, int]:
    """(documents, tokens) of the short-document loss: the first MAX_SHORT_DOCUMENTS documents
    of 2 to SHORT_LIMIT - 1 tokens, each predicting all its tokens but the first."""
    lengths = IndexedReader(str(prefix)).lengths
    chosen = lengths[(lengths < SHORT_LIMIT) & (lengths >= 2)][:MAX_SHORT_DOCUMENTS]
    return len(chosen), int(np.sum(chosen - 1))


def _stage(script: str, env: dict, *args: str, timeout: float = 600):
    result = run_command(["bash", f"{PROLONG}/{script}", *args], timeout=timeout, env=env)
    assert result.returncode == 0, f"{script}:\n{result.stdout[-4000:]}"
    return result.stdout


def _saved_rope_base(run_dir) -> float:
    step = (run_dir / "latest").read_text().strip()
    return json.loads((run_dir / step / "engine_state.json").read_text())["model_config"][
        "rope_base"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_tiny_recipe_trains_every_stage_exports_and_evaluates(tiny_work):
    # The launch's rendezvous port: a free one, not the scripts' default another job may hold.
    env = recipe_env(WORK=tiny_work, MASTER_PORT=free_port())
    checkpoints = tiny_work / "checkpoints"
    stage1, stage2, sft = (checkpoints / name for name in (
        "prolong-stage1-64k", "prolong-stage2-512k", "prolong-sft"))

    # The trainer's own checks run in one process before torchrun starts anything.
    refused = run_command(["bash", f"{PROLONG}/04_train_stage1_64k.sh", "optimizer.lr=-1"],
                          timeout=300, env=env)
    assert refused.returncode == 2, refused.stdout[-4000:]
    assert "optimizer.lr = -1 must be > 0" in refused.stdout
    assert "engine.train refused the run (the error above); nothing was launched" in refused.stdout
    assert not stage1.exists()
    # The port torchrun would listen on is checked there too (the script passes MASTER_PORT).
    with socket.socket() as holder:
        holder.bind(("", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        refused = run_command(["bash", f"{PROLONG}/04_train_stage1_64k.sh"], timeout=300,
                              env=dict(env, MASTER_PORT=str(taken)))
    assert refused.returncode == 2, refused.stdout[-4000:]
    assert f"MASTER_PORT {taken} cannot be used (another process is listening on it)" in (
        refused.stdout)
    assert "nothing was launched" in refused.stdout and not stage1.exists()

    output = _stage("04_train_stage1_64k.sh", env)
    # The planner's layout for 2 CPU processes, checked in one process first.
    assert "run plan ok: TP1 x PP1 x CP1 x DP2 +DistOpt, 2 x 128 tokens per step" in output
    assert f"initialized from {checkpoints}/llama3-8b-instruct/step_00000000 (optimizer state: " \
           f"False); new RoPE base 8e+06" in output
    output = _stage("05_train_stage2_512k.sh", env)
    assert (f"initialized from {stage1}/step_{STEPS:08d} (optimizer state: True); new RoPE "
            f"base 1.28e+08") in output
    output = _stage("06_sft.sh", env)
    assert (f"initialized from {stage2}/step_{STEPS:08d} (optimizer state: False)") in output
    sft_packed = json.loads((tiny_work / "data" / "packed" / "sft" / "packed.json").read_text())
    assert sft_packed["seq_length"] == 512

    # The published peak learning rates and RoPE bases, stage after stage.
    for run_dir, lr, rope_base in ((stage1, 1e-5, 8e6), (stage2, 5e-6, 1.28e8),
                                   (sft, 2e-5, 1.28e8)):
        metrics = read_metrics(run_dir)
        assert sorted(metrics) == list(range(1, STEPS + 1)), run_dir.name
        assert metrics[1]["lr"] == pytest.approx(lr), run_dir.name
        for step in range(2, STEPS + 1):
            assert metrics[step]["lr"] == pytest.approx(scheduled_lr(lr, step), rel=1e-9), (
                f"{run_dir.name} step {step} trained at lr {metrics[step]['lr']}; the cosine "
                f"from {lr} to lr x min_lr_ratio = {lr * MIN_LR_RATIO} gives "
                f"{scheduled_lr(lr, step)}")
        scheduler = read_checkpoint_state(latest_checkpoint(run_dir))["scheduler"]
        assert (scheduler["num_steps"], scheduler["max_lr"], scheduler["min_lr"]) == (
            STEPS, pytest.approx(lr), pytest.approx(lr * MIN_LR_RATIO)), (
            f"{run_dir.name} ended with the schedule {scheduler}, not {STEPS} steps from {lr} "
            f"down to {lr * MIN_LR_RATIO}")
        assert _saved_rope_base(run_dir) == rope_base
    # Stage 2 at 4x stage 1's length; SFT counts only assistant tokens.
    assert read_metrics(stage1)[1]["valid_tokens"] <= 2 * 128
    assert 2 * 128 < read_metrics(stage2)[1]["valid_tokens"] <= 2 * 512
    assert all(0 < m["valid_tokens"] < 2 * 512 * 0.9 for m in read_metrics(sft).values())

    _stage("07_export_hf.sh", env)
    hf = tiny_work / "hf" / "prolong-8b-instruct"
    config = json.loads((hf / "config.json").read_text())
    assert config["rope_theta"] == 1.28e8 and config["vocab_size"] == 128_256
    tensors = {}
    for shard in sorted(hf.glob("*.safetensors")):
        tensors.update(load_file(shard))
    assert len(tensors) == 3 + 9 * 4  # embeddings, final norm, lm_head + 4 layers
    # The tokenizer files of the model the recipe started from, copied byte for byte.
    original = tiny_work / "hf-tiny-llama3"
    copied = sorted(name for name in TOKENIZER_FILES if (original / name).is_file())
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(copied), copied
    assert sorted(name for name in TOKENIZER_FILES if (hf / name).is_file()) == copied
    for name in copied:
        assert (hf / name).read_bytes() == (original / name).read_bytes(), (
            f"the export's {name} differs from {original / name}")

    # torchrun --standalone evaluates on a port of its own: a taken MASTER_PORT in the
    # environment is no reason for 08's check to refuse.
    with socket.socket() as holder:
        holder.bind(("", 0))
        holder.listen()
        _stage("08_evaluate.sh", dict(env, MASTER_PORT=str(holder.getsockname()[1])),
               timeout=900)
    report = json.loads((tiny_work / "eval" / "report.json").read_text())
    models = {entry["name"]: entry for entry in report["checkpoints"]}
    assert list(models) == ["base", "stage1", "stage2", "sft", "hf"]
    assert [models[name]["scoring"] for name in models] == ["teacher_forced"] * 4 + ["generation"]
    tokenized = tiny_work / "data" / "tokenized"
    position_tokens = expected_position_tokens(tokenized / "code-repos")
    short_documents, short_tokens = expected_short_tokens(tokenized / "docs")
    assert position_tokens[0][2] > 0 and short_tokens > 0
    for name, entry in models.items():
        cells = entry["recall"]["cells"]
        assert sorted({(c["task"], c["length"]) for c in cells}) == sorted(
            (task, length) for task in {c["task"] for c in cells} for length in (256, 512))
        assert len({c["task"] for c in cells}) == 6 and {c["depth"] for c in cells} == {0.5}
        # Every model scored exactly the same tokens, each bucket holding all its positions.
        buckets = [(b["start"], b["end"], b["tokens"]) for b in entry["position_loss"]]
        assert buckets == position_tokens, (
            f"{name}: loss by position counted {buckets}, not {position_tokens} "
            f"(start, end, tokens)")
        assert all(math.isfinite(b["loss"]) for b in entry["position_loss"]), name
        short_loss = entry["short_document_loss"]
        assert (short_loss["documents"], short_loss["tokens"]) == (
            short_documents, short_tokens), (
            f"{name}: the short-document loss counted {short_loss['documents']} documents and "
            f"{short_loss['tokens']} tokens, not {short_documents} and {short_tokens}")
    # The export is the SFT checkpoint in bf16: the same loss within bf16 rounding; training
    # moved every stage away from the base.
    short = {name: entry["short_document_loss"]["loss"] for name, entry in models.items()}
    assert short["hf"] == pytest.approx(short["sft"], rel=1e-3)
    assert len({short[name] for name in ("base", "stage1", "stage2", "sft")}) == 4
    assert (tiny_work / "eval" / "report.md").exists()
