"""The TINY=1 recipe on one host, script after script as a user runs it (01-03 in the
tiny_work fixture, then 04 -> 08): every stage starts from the previous one with the published
schedule and RoPE base, the export carries the trained model, and the evaluation reports every
stage and the export side by side."""
import json

import pytest
from safetensors.torch import load_file

from tests.distributed import run_command
from tests.examples.conftest import read_metrics
from tests.examples.system import recipe_env

PROLONG = "examples/prolong"
STEPS = 4  # TINY=1 (examples/prolong/tiny/train.yaml)


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
    env = recipe_env(WORK=tiny_work)
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
        assert metrics[STEPS]["lr"] < lr
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
    assert (hf / "tokenizer.json").exists()

    _stage("08_evaluate.sh", env, timeout=900)
    report = json.loads((tiny_work / "eval" / "report.json").read_text())
    models = {entry["name"]: entry for entry in report["checkpoints"]}
    assert list(models) == ["base", "stage1", "stage2", "sft", "hf"]
    assert [models[name]["scoring"] for name in models] == ["teacher_forced"] * 4 + ["generation"]
    for entry in models.values():
        cells = entry["recall"]["cells"]
        assert sorted({(c["task"], c["length"]) for c in cells}) == sorted(
            (task, length) for task in {c["task"] for c in cells} for length in (256, 512))
        assert len({c["task"] for c in cells}) == 6 and {c["depth"] for c in cells} == {0.5}
        assert entry["position_loss"] and entry["short_document_loss"]["tokens"] > 0
    # The export is the SFT checkpoint in bf16: the same loss within bf16 rounding; training
    # moved every stage away from the base.
    short = {name: entry["short_document_loss"]["loss"] for name, entry in models.items()}
    assert short["hf"] == pytest.approx(short["sft"], rel=1e-3)
    assert len({short[name] for name in ("base", "stage1", "stage2", "sft")}) == 4
    assert (tiny_work / "eval" / "report.md").exists()
