"""Damaged and non-finite checkpoints, tried as a user would: a same-size overwrite, a cut tensor
file, a half-written engine_state.json, NaN weights or optimizer state. Each case checks that the
damage is named (file or tensor), that a resume lands on the newest intact checkpoint and then
trains exactly as the uninterrupted run did, and that nothing is lost (damaged checkpoints are
set aside, never deleted; keep_last keeps the checkpoint from before the non-finite steps)."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch.distributed.checkpoint as dcp

from engine.checkpoint import DamagedCheckpoint, read_checkpoint_state, verify_checkpoint
from engine.checkpoint import integrity
from engine.convert.__main__ import main as convert_main
from engine.convert.export import export_checkpoint
from engine.convert.importer import import_checkpoint
from tests.distributed import free_port, run_command, test_env, torchrun
from tests.engine.conftest import TRAIN_TEST_CONFIG
from tests.engine.test_convert_layouts import random_hf_llama
from tests.engine.test_train import metrics, train_args

STEPS = 4
QUIET = {"log": lambda *_: None}


def step(run: Path, number: int) -> Path:
    return run / f"step_{number:08d}"


def tensor_file(step_dir: Path, index: int) -> Path:
    """Rank 0's index-th tensor file of a checkpoint (megatron-core 0.16 writes two per rank,
    0.18 one: then every index names that one)."""
    files = sorted(step_dir.glob("__0_*.distcp"))
    return files[min(index, len(files) - 1)]


def overwrite_middle(path: Path, size: int, offset: int | None = None) -> None:
    """``size`` bytes of 0xFF at ``offset`` (default: the middle); the file keeps its size."""
    offset = (path.stat().st_size - size) // 2 if offset is None else offset
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(b"\xff" * size)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train(run: Path, config: str, data: str, *overrides, launcher="python"):
    """engine.train on one process: under torchrun as users launch it, or plain python (what
    torchrun runs per rank; its exit code is the engine's own, 2 for a refused input)."""
    args = train_args(config, data, run, f"train_steps={STEPS}", "checkpoint.save_interval=1",
                      *overrides)
    if launcher == "torchrun":
        return torchrun("engine.train", 1, args, check=False)
    # A free port: the default (29500) may be taken by another job on the machine.
    return run_command([sys.executable, "-m", "engine.train", *args], timeout=300,
                       env=test_env(MASTER_PORT=free_port()))


@pytest.fixture(scope="module")
def trained(packed_tiny_dataset, tmp_path_factory):
    """A 4-step run with a checkpoint after every step, and its losses."""
    run = tmp_path_factory.mktemp("trained") / "run"
    config = run.parent / "train.yaml"
    config.write_text(TRAIN_TEST_CONFIG)
    result = train(run, str(config), packed_tiny_dataset, "checkpoint.keep_last=4")
    assert result.returncode == 0, result.stdout[-3000:]
    assert [p.name for p in sorted(run.glob("step_*"))] == [step(run, n).name
                                                             for n in range(1, STEPS + 1)]
    return run, str(config), metrics(run)


def copy_run(trained, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    (run / "metrics.jsonl").unlink()  # the resumed run's own log only
    return run


# ---------------------------------------------------------------------------------------------
# Resume: skip what is damaged, land on the newest intact checkpoint, train as before
# ---------------------------------------------------------------------------------------------

def test_resume_skips_damaged_checkpoints_and_trains_as_the_uninterrupted_run(
        trained, packed_tiny_dataset, tmp_path):
    run = copy_run(trained, tmp_path)
    shard = tensor_file(step(run, 4), 0)
    overwrite_middle(shard, 4096)  # same size: only the checksum can tell
    cut = tensor_file(step(run, 3), 1)
    saved_size = cut.stat().st_size
    cut.write_bytes(cut.read_bytes()[:saved_size // 2])
    state_file = step(run, 2) / "engine_state.json"
    state_file.write_text(state_file.read_text()[:300])  # as if the writer died mid-file
    damaged = {n: {f.relative_to(step(run, n)).as_posix(): digest(f)
                   for f in step(run, n).rglob("*") if f.is_file()} for n in (2, 3, 4)}

    result = train(run, trained[1], packed_tiny_dataset, "checkpoint.keep_last=4",
                   launcher="torchrun")
    assert result.returncode == 0, result.stdout[-4000:]
    out = result.stdout
    assert (f"cannot resume from {step(run, 4)}: {shard}: its contents differ from what was "
            f"saved (checksum mismatch)") in out
    assert f"{cut} has {saved_size // 2} bytes, {saved_size} were saved (cut short)" in out
    assert f"cannot resume from {step(run, 2)}: {state_file} has " in out
    assert (f"resuming from {step(run, 1)}, the newest intact checkpoint, instead of "
            f"step_00000004, step_00000003, step_00000002") in out
    assert f"resumed from {step(run, 1)} at step 1 (4 samples consumed)" in out

    # Steps 2-4 again, bit for bit as the uninterrupted run.
    expected, resumed = trained[2], metrics(run)
    assert sorted(resumed) == [2, 3, 4]
    for n in resumed:
        assert resumed[n]["loss"] == expected[n]["loss"], n
        assert resumed[n]["grad_norm"] == expected[n]["grad_norm"], n
    # Nothing lost: each damaged checkpoint is set aside byte for byte; the new ones verify.
    for n, files in damaged.items():
        aside = run / f"damaged_step_{n:08d}"
        assert {f.relative_to(aside).as_posix(): digest(f)
                for f in aside.rglob("*") if f.is_file()} == files
    assert (run / "latest").read_text().strip() == "step_00000004"
    assert all(verify_checkpoint(step(run, n)) for n in range(1, STEPS + 1))
    assert read_checkpoint_state(step(run, 4))["train_state"]["consumed_samples"] == 16


def test_resume_with_no_intact_checkpoint_exits_2_naming_each(trained, packed_tiny_dataset,
                                                              tmp_path):
    run = copy_run(trained, tmp_path)
    before = {}
    for n in range(1, STEPS + 1):
        overwrite_middle(tensor_file(step(run, n), 1), 4096)
        before[n] = digest(tensor_file(step(run, n), 1))
    result = train(run, trained[1], packed_tiny_dataset)
    assert result.returncode == 2, result.stdout[-3000:]
    (message,) = [line for line in result.stdout.splitlines()
                  if line.startswith(f"error: no intact checkpoint in {run} to resume from: ")]
    for n in range(1, STEPS + 1):
        assert f"step_{n:08d}: {tensor_file(step(run, n), 1)}: its contents differ" in message
    assert "Restore them from a copy, or move them out of" in message
    # Nothing was trained, moved or deleted.
    assert not (run / "metrics.jsonl").exists()
    assert {n: digest(tensor_file(step(run, n), 1)) for n in before} == before
    assert (run / "latest").read_text().strip() == "step_00000004"


def test_checkpoint_saved_before_manifests_still_resumes_with_a_note(
        trained, packed_tiny_dataset, tmp_path):
    run = copy_run(trained, tmp_path)
    legacy = step(run, 4)
    (legacy / integrity.MANIFEST_FILE).unlink()
    state = json.loads((legacy / "engine_state.json").read_text())
    for field in ("manifest", "skipped_steps", "skipped_steps_total"):
        del state[field]
    (legacy / "engine_state.json").write_text(json.dumps(state))
    result = train(run, trained[1], packed_tiny_dataset, f"train_steps={STEPS + 1}")
    assert result.returncode == 0, result.stdout[-3000:]
    assert (f"note: {legacy} has no manifest.json (saved before checkpoints had one): its files "
            f"cannot be checked, loading them as they are") in result.stdout
    assert f"resumed from {legacy} at step 4" in result.stdout
    assert sorted(metrics(run)) == [5] and verify_checkpoint(step(run, 5))


def test_init_from_a_cut_checkpoint_stops_before_any_process_group(trained, packed_tiny_dataset,
                                                                   tmp_path):
    source = copy_run(trained, tmp_path)
    cut = tensor_file(step(source, 4), 0)
    cut.write_bytes(cut.read_bytes()[:1000])
    result = run_command([sys.executable, "-m", "engine.train", *train_args(
        trained[1], packed_tiny_dataset, tmp_path / "stage2", f"checkpoint.init_from={source}",
        "train_steps=1")], timeout=120)
    assert result.returncode == 2, result.stdout[-3000:]
    assert f"checkpoint.init_from: {cut} has 1000 bytes" in result.stdout
    assert "Initializing" not in result.stdout and not (tmp_path / "stage2").exists()


# ---------------------------------------------------------------------------------------------
# What verification names, case by case (no process group: one rank checks every file)
# ---------------------------------------------------------------------------------------------

def _cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


@pytest.mark.parametrize("damage, file, fragment", [
    (lambda p: overwrite_middle(p, 4096), "__0_0.distcp",
     "its contents differ from what was saved (checksum mismatch)"),
    (_cut_in_half, "__0_1.distcp", "were saved (cut short)"),
    (_cut_in_half, "engine_state.json", "were saved (cut short)"),
    (lambda p: p.write_text(p.read_text().replace('"step": 4', '"step": 5')),
     "engine_state.json", "its contents differ"),
    (Path.unlink, "rng/rank00000.pt", "is missing"),
    (lambda p: p.write_text("notes"), "README.txt", "is not listed in manifest.json"),
    (_cut_in_half, "manifest.json", "is not a complete manifest"),
    (Path.unlink, "manifest.json", "is missing, but"),
])
def test_verification_names_the_damaged_file(trained, tmp_path, damage, file, fragment):
    checkpoint = tmp_path / "step"
    shutil.copytree(step(trained[0], 4), checkpoint)
    target = tensor_file(checkpoint, int(file[4])) if file.endswith(".distcp") else checkpoint / file
    damage(target)
    with pytest.raises(DamagedCheckpoint) as error:
        verify_checkpoint(checkpoint)
    assert str(target) in str(error.value) and fragment in str(error.value)


def test_export_checks_only_the_blocks_holding_weights(trained, tmp_path, monkeypatch):
    """With small blocks, damage inside an Adam moment leaves the weights' blocks intact: export
    (which reads no optimizer state) goes ahead, a full check (resume) refuses; damage inside a
    weight stops both, naming the file and the byte range."""
    checkpoint = tmp_path / "step"
    shutil.copytree(step(trained[0], 4), checkpoint)
    monkeypatch.setattr(integrity, "BLOCK_BYTES", 4096)
    integrity.write_manifest(checkpoint)  # the same files, checksummed in 4 KiB blocks
    stored = {index.fqn: data for index, data in
              dcp.FileSystemReader(str(checkpoint)).read_metadata().storage_data.items()
              if data.relative_path == tensor_file(checkpoint, 0).name}
    moment = stored["optimizer.state.exp_avg.output_layer.weight"]
    overwrite_middle(tensor_file(checkpoint, 0), 8192, moment.offset + moment.length // 2)
    export_checkpoint(checkpoint, tmp_path / "hf", dtype="float32", **QUIET)
    assert (tmp_path / "hf" / "config.json").exists()
    with pytest.raises(DamagedCheckpoint, match=r"__0_0\.distcp: bytes \d+-\d+ \(block \d+ of"):
        verify_checkpoint(checkpoint)

    weight = stored["embedding.word_embeddings.weight"]
    overwrite_middle(tensor_file(checkpoint, 0), 4, weight.offset + weight.length // 2)
    message = _export_rejected(checkpoint, tmp_path)
    assert f"{tensor_file(checkpoint, 0)}: bytes " in message and "differ from what was saved" \
        in message


def _export_rejected(checkpoint: Path, tmp_path: Path, *args) -> str:
    """Run ``python -m engine.convert export`` in-process; exit 2, one message, no output."""
    out, stderr = tmp_path / "rejected", io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = convert_main(["export", "--checkpoint", str(checkpoint), "--out", str(out), *args])
    assert code == 2, stderr.getvalue()
    assert not out.exists() and not list(tmp_path.glob(".rejected.tmp-*"))
    return stderr.getvalue().strip().splitlines()[-1]


def test_export_refuses_nan_weights_naming_the_tensor(trained, tmp_path):
    """A checkpoint whose files are intact but whose weights hold NaN (saved by an engine
    without the save-time check): export stops at the tensor, naming a good checkpoint."""
    run = copy_run(trained, tmp_path)
    checkpoint = step(run, 4)
    stored = {index.fqn: data for index, data in
              dcp.FileSystemReader(str(checkpoint)).read_metadata().storage_data.items()}
    weight = stored["embedding.word_embeddings.weight"]
    # torch.save aligns tensor data to 64 bytes in its zip: 64-aligned 0xFF words are NaN floats.
    overwrite_middle(checkpoint / weight.relative_path, 4096,
                     weight.offset + weight.length // 2 // 64 * 64)
    integrity.write_manifest(checkpoint)
    message = _export_rejected(checkpoint, tmp_path, "--dtype", "float32")
    assert message == (f"error: {checkpoint}: tensor embedding.word_embeddings.weight holds 1024 "
                       f"NaN or Inf values of 32768; refusing to export non-finite weights; "
                       f"the newest good checkpoint before it is {step(run, 3)}")


def test_hf_import_writes_a_manifest(tmp_path):
    random_hf_llama(tmp_path / "hf")
    result = import_checkpoint(tmp_path / "hf", tmp_path / "ckpt", **QUIET)
    manifest = integrity.read_manifest(result.checkpoint)
    files = {p.relative_to(result.checkpoint).as_posix() for p in result.checkpoint.rglob("*")
             if p.is_file()} - {integrity.MANIFEST_FILE}
    assert set(manifest["files"]) == files and "engine_state.json" in files
    assert verify_checkpoint(result.checkpoint)
    overwrite_middle(result.checkpoint / "__0_0.distcp", 16)
    with pytest.raises(DamagedCheckpoint, match="__0_0.distcp: its contents differ"):
        verify_checkpoint(result.checkpoint)


# ---------------------------------------------------------------------------------------------
# Non-finite values: never saved; keep_last keeps the checkpoint from before them
# ---------------------------------------------------------------------------------------------

def test_nan_weight_or_optimizer_state_refuses_to_save(tmp_path):
    root = tmp_path / "ckpt"
    result = torchrun("tests.engine.checkpoint_worker", 2, [str(root)], timeout=300)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["first"] is None and report["after_first"] == ["latest", "step_00000001"]
    good = (f"The newest good checkpoint is {root / 'step_00000001'}: resume from it (latest "
            f"names it)")
    weight = report["weight"]
    assert weight["refused"] == (
        f"refusing to save step 2 into {root}: NaN or Inf in {weight['name']} (1 of "
        f"{weight['numel']} values) on rank 1. {good}")
    moment = report["moment"]
    assert moment["refused"] == (
        f"refusing to save step 3 into {root}: NaN or Inf in optimizer exp_avg of "
        f"{moment['name']} (1 of {moment['numel']} values) on rank 0. {good}")
    # Nothing was written for the refused steps, not even a temporary directory.
    assert weight["after"] == moment["after"] == ["latest", "step_00000001"]
    assert report["last"] is None and report["latest"] == "step_00000004"
    assert report["after_last"] == ["latest", "step_00000001", "step_00000004"]


def test_keep_last_keeps_the_checkpoint_from_before_nan_steps(trained, packed_tiny_dataset,
                                                              tmp_path):
    run = tmp_path / "run"
    # Steps 2, 3 and 4 have a non-finite loss (skipped); the third in a row stops the run.
    result = train(run, trained[1], packed_tiny_dataset, "checkpoint.keep_last=2",
                   "inject_nan_steps=[1,2,3]")
    assert result.returncode == 2, result.stdout[-3000:]
    # keep_last=2 alone would have deleted step 1, the only one saved before a skipped step.
    assert [p.name for p in sorted(run.glob("step_*"))] == [
        "step_00000001", "step_00000002", "step_00000003"]
    skipped = [(read_checkpoint_state(step(run, n))["skipped_steps"],
                read_checkpoint_state(step(run, n))["skipped_steps_total"]) for n in (1, 2, 3)]
    assert skipped == [(0, 0), (1, 1), (1, 2)]
    assert (f"3 consecutive steps had a non-finite loss (last: step 4); stopping. Check the data "
            f"at these steps and lower optimizer.lr. The newest good checkpoint is "
            f"{step(run, 1)}: to resume from it, write step_00000001 into {run / 'latest'}"
            ) in result.stdout

    # Following the message: the run goes on from step 1 exactly as the one without NaN did.
    (run / "latest").write_text("step_00000001\n")
    (run / "metrics.jsonl").unlink()
    result = train(run, trained[1], packed_tiny_dataset, "checkpoint.keep_last=2")
    assert result.returncode == 0, result.stdout[-3000:]
    resumed = metrics(run)
    assert sorted(resumed) == [2, 3, 4]
    for n in resumed:
        assert resumed[n]["loss"] == trained[2][n]["loss"], n
    assert [p.name for p in sorted(run.glob("step_*"))] == ["step_00000003", "step_00000004"]
    assert read_checkpoint_state(step(run, 4))["skipped_steps_total"] == 0


# ---------------------------------------------------------------------------------------------
# Interrupted saves: latest always names a verified checkpoint, nothing half-written stays
# ---------------------------------------------------------------------------------------------

def test_a_save_interrupted_after_any_step_keeps_latest_on_a_whole_checkpoint(tmp_path):
    """An exception after each step of save_checkpoint in turn (interrupted_save_worker), and a
    full disk while the tensors are written: ``latest`` names a checkpoint that verifies, a
    resume loads exactly its weights, step 1 is never lost, no .tmp_step_* stays behind, and
    no process was forked to write (nothing can outlive the trainer)."""
    root = tmp_path / "ckpt"
    result = torchrun("tests.engine.interrupted_save_worker", 1, [str(root)], timeout=300)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["first"] is None
    assert report["forks"] == 0 and report["children"] == [], (
        f"saving started processes ({report['forks']} forks, children {report['children']}): "
        f"a writer could outlive the trainer")
    published_before_latest = {"tensors": "step_00000001", "rng": "step_00000001",
                               "checksums": "step_00000001", "engine_state": "step_00000001",
                               "manifest": "step_00000001", "publish": "step_00000001",
                               "latest": "step_00000002", "prune": "step_00000002",
                               "disk_full": "step_00000002"}
    for name, case in report["cases"].items():
        expected = published_before_latest[name]
        assert case["latest"] == expected, (
            f"a save interrupted after '{name}' left latest naming {case['latest']}, not "
            f"{expected}: latest must move only after the manifest and the publishing rename")
        assert case["latest_verifies"] is True, (
            f"interrupted after '{name}': latest names a checkpoint that does not verify: "
            f"{case['latest_verifies']}")
        assert case["resumed_from"] == expected and case["resumed_weights_equal"], (
            f"interrupted after '{name}': the resume loaded {case['resumed_from']} "
            f"(weights equal to the saved ones: {case.get('resumed_weights_equal')})")
        assert case["step1_verifies"] is True, f"interrupted after '{name}': step 1 was lost"
        assert not [n for n in case["contents"] if n.startswith(".tmp")], (
            f"interrupted after '{name}': the temporary folder stayed behind: {case['contents']}")
        assert case["forks"] == 0 and case["children"] == [], (
            f"interrupted after '{name}': the save started processes ({case['forks']} forks, "
            f"children {case['children']}): a writer could outlive the trainer")
    for name in published_before_latest:
        if name != "disk_full":
            assert report["cases"][name]["outcome"] == f"Interrupted: interrupted after {name}"
    full = report["cases"]["disk_full"]["outcome"]
    assert full.startswith(f"CheckpointError: cannot save step 2 into {root}: No space left on "
                           f"device ({root / '__0_0.distcp'}); nothing of step 2 was kept"), full
    assert report["last"] is None and report["after_last"]["latest"] == "step_00000003"
    assert report["after_last"]["resumed_weights_equal"] and report["after_last"]["forks"] == 0
    assert report["after_last"]["contents"] == ["latest", "step_00000002", "step_00000003"]


# ---------------------------------------------------------------------------------------------
# Files of several real blocks; manifests and engine states that are damaged, not crashes
# ---------------------------------------------------------------------------------------------

def _folder_with_manifest(tmp_path: Path, size: int) -> Path:
    """A checkpoint-like folder holding one tensor file of ``size`` random bytes and a manifest
    at the engine's own block size (no patched BLOCK_BYTES)."""
    import numpy as np

    folder = tmp_path / "step"
    folder.mkdir()
    (folder / "__0_0.distcp").write_bytes(np.random.default_rng(0).bytes(size))
    integrity.write_manifest(folder)
    return folder


def test_damage_in_a_late_block_of_a_multi_block_file_is_found(tmp_path):
    block = integrity.BLOCK_BYTES
    folder = _folder_with_manifest(tmp_path, 3 * block + 1000)  # 4 blocks, the last short
    assert len(integrity.read_manifest(folder)["files"]["__0_0.distcp"]["crc32"]) == 4
    assert verify_checkpoint(folder)
    shard = folder / "__0_0.distcp"
    overwrite_middle(shard, 16, 2 * block + 5)
    try:
        verify_checkpoint(folder)
    except DamagedCheckpoint as error:
        message = str(error)
    else:
        pytest.fail("a file of 4 blocks damaged in block 2 verified: the blocks of files above "
                    "one block are not checked")
    assert (f"{shard}: bytes {2 * block}-{3 * block - 1} (block 2 of 4) differ from what was "
            f"saved") in message, f"a damaged block 2 of 4 not named: {message}"
    overwrite_middle(shard, 16, 3 * block + 10)  # the short last block too
    with pytest.raises(DamagedCheckpoint, match=r"\(block 2 of 4, and 1 more\)"):
        verify_checkpoint(folder)


def test_a_manifest_with_an_absurd_block_size_is_damage_not_a_memory_error(tmp_path):
    folder = _folder_with_manifest(tmp_path, 1000)
    manifest = json.loads((folder / integrity.MANIFEST_FILE).read_text())
    manifest["block_bytes"] = 1 << 40  # one block for any file: the checksum count still fits
    (folder / integrity.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(DamagedCheckpoint, match=r"block_bytes 1099511627776.*not what this "
                                                r"engine writes"):
        verify_checkpoint(folder)


@pytest.mark.parametrize("state", [{"step": 4}, {"step": 4, "model_config": {"num_layers": 2}},
                                   [1, 2]], ids=["no_model_config", "no_shape", "a_list"])
def test_an_engine_state_without_its_model_config_is_a_damaged_checkpoint(tmp_path, state):
    from engine.checkpoint import check_compatible, model_config_from_state
    from engine.model.config import get_model_config

    folder = tmp_path / "step"
    folder.mkdir()
    (folder / "engine_state.json").write_text(json.dumps(state))
    with pytest.raises(DamagedCheckpoint, match=f"{folder / 'engine_state.json'} "
                                                f"(has no |holds a JSON list)"):
        check_compatible(folder, get_model_config("tiny"))
    if isinstance(state, dict):
        with pytest.raises(DamagedCheckpoint, match="the checkpoint is damaged"):
            model_config_from_state(state, folder)
