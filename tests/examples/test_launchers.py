"""The launch scripts' contract, without training: every setting is listed by --help, bad or
missing input stops with exit code 2 naming it before anything runs, the layout is the
planner's unless TP/PP/CP are set, and shellcheck passes on every script."""
import json
import re
import shlex
import shutil
import subprocess
import time

import pytest

from engine.recipe.settings import STAGE_GROUPS, stage_settings
from tests.distributed import REPO, run_command
from tests.examples.system import recipe_env, require

PROLONG = sorted((REPO / "examples" / "prolong").glob("0*.sh"))
LAUNCHERS = [*PROLONG, REPO / "examples" / "train_torchrun.sh"]


def _script(name: str) -> str:
    return next(str(p.relative_to(REPO)) for p in PROLONG if p.name.startswith(name))


def _run(script: str, *args: str, **env) -> subprocess.CompletedProcess:
    return run_command(["bash", script, *args], timeout=60, env=recipe_env(**env))


def test_the_recipe_has_one_script_per_stage_in_order():
    assert [p.name[:3] for p in PROLONG] == [f"{i:02d}_" for i in range(1, 9)]


def _stage_of(script) -> str:
    """The engine.recipe stage a script hands over to (its `run_stage STAGE` line)."""
    return re.search(r"^run_stage (\S+) \"\$@\"$", script.read_text(), re.M).group(1)


@pytest.mark.parametrize("script", LAUNCHERS, ids=lambda p: p.name)
def test_help_lists_every_setting_of_the_script_with_its_default(script):
    result = _run(str(script), "--help", TINY=0)
    assert result.returncode == 0, result.stdout
    stage = _stage_of(script)
    names = [setting.name for setting in stage_settings(stage) if setting.group == stage]
    assert names, f"{script.name} declares no setting"
    for name in [*names, "TINY", "PYTHON"]:
        assert re.search(rf"^  {name}=.*\n        .+ \[default: ", result.stdout, re.M), (
            f"--help misses {name}")
    if "launch" in STAGE_GROUPS[stage]:
        for name in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE",
                     "TP", "PP", "CP", "GLOBAL_BATCH", "TRAIN_STEPS", "VERBOSE"):
            assert re.search(rf"^  {name}=.*\n        .+ \[default: ", result.stdout, re.M), name
    # The usage is the script's header comment.
    assert result.stdout.startswith(script.read_text().splitlines()[1][2:] + "\n")


@pytest.fixture
def fake_work(tmp_path):
    """A WORK whose stage inputs exist as far as the checks look (packed.json, latest)."""
    for stage, length in (("stage1", 65536), ("stage2", 524288)):
        folder = tmp_path / "data" / "packed" / stage
        folder.mkdir(parents=True)
        (folder / "packed.json").write_text(json.dumps({"seq_length": length}))
    for run in ("llama3-8b-instruct", "prolong-stage1-64k", "prolong-stage2-512k"):
        folder = tmp_path / "checkpoints" / run
        folder.mkdir(parents=True)
        (folder / "latest").write_text("step_00000000\n")
    return tmp_path


BAD_INPUT = [
    ("01", dict(MANIFEST="/nonexistent/sources.tsv"), "MANIFEST=/nonexistent/sources.tsv: no such file"),
    ("01", dict(DATA_FROM="prolong"), "PROLONG_DATA_64K is not set"),
    ("01", dict(DATA_FROM="hf"), "DATA_FROM=hf must be raw or prolong"),
    ("02", dict(STAGE1_RECIPE="/nonexistent.yaml"), "STAGE1_RECIPE=/nonexistent.yaml: no such file"),
    ("03", dict(TINY=0), "HF_MODEL is not set"),
    ("03", dict(TINY=0, HF_MODEL="/nonexistent/llama"), "HF_MODEL=/nonexistent/llama: no such folder"),
    ("04", dict(NNODES=2, NODE_RANK=2), "NODE_RANK=2 must be below NNODES=2"),
    ("04", dict(GPUS_PER_NODE="eight"), "GPUS_PER_NODE=eight must be an integer"),
    ("04", dict(TINY=0, TP=3), "TP x PP x CP = 3 x 1 x 1 does not divide NNODES x GPUS_PER_NODE = 8"),
    ("04", dict(TINY=0, GPUS_PER_NODE=6), "the planner found no layout"),
    ("05", dict(STAGE1_CKPT="/nonexistent/run"), "no checkpoint at /nonexistent/run"),
    ("06", dict(TINY=0, HF_MODEL="/m"), "SFT_DATA is not set"),
    ("06", dict(SFT_DATA="/nonexistent/*.jsonl"), "SFT_DATA: '/nonexistent/*.jsonl' matches no file"),
    ("07", dict(), "EXPORT_FROM="),
    ("08", dict(), "EVAL_CHECKPOINTS: no engine checkpoint at "),  # no SFT run in fake_work
    ("08", dict(EVAL_CHECKPOINTS="none", EVAL_HF="x=/nonexistent/hf"),
     "EVAL_HF: no Hugging Face model at /nonexistent/hf ('x=/nonexistent/hf'; no config.json)"),
    ("08", dict(EVAL_CHECKPOINTS="none", EVAL_HF="none"), "EVAL_CHECKPOINTS and EVAL_HF are both none"),
    ("08", dict(EVAL_CHECKPOINTS="base=$WORK/checkpoints/llama3-8b-instruct", EVAL_HF="none",
                EVAL_LONG_DOCUMENTS="none", EVAL_SHORT_DOCUMENTS="/nonexistent/docs"),
     "EVAL_SHORT_DOCUMENTS=/nonexistent/docs: no indexed dataset there"),
    ("08", dict(EVAL_CHECKPOINTS="base=$WORK/checkpoints/llama3-8b-instruct", EVAL_HF="none",
                EVAL_LONG_DOCUMENTS="none", EVAL_SHORT_DOCUMENTS="none", EVAL_TP=4),
     "EVAL_TP x EVAL_PP x EVAL_CP = 4 x 1 x 1 does not divide EVAL_GPUS=2"),
    ("08", dict(EVAL_CHECKPOINTS="base=$WORK/checkpoints/llama3-8b-instruct", EVAL_HF="none",
                EVAL_LONG_DOCUMENTS="none", EVAL_SHORT_DOCUMENTS="none", EVAL_LENGTHS="256 abc"),
     "EVAL_LENGTHS=256 abc: 'abc' is not a length in tokens (a whole number >= 1)"),
    # engine.evaluate --check, before torchrun: its message, then the script's.
    ("08", dict(EVAL_CHECKPOINTS="base=$WORK/checkpoints/llama3-8b-instruct", EVAL_HF="none",
                EVAL_LONG_DOCUMENTS="none", EVAL_SHORT_DOCUMENTS="none",
                EVAL_TASKS="niah_single niah_triple"),
     "invalid choice: 'niah_triple'"),
    ("08", dict(EVAL_CHECKPOINTS="base=$WORK/checkpoints/llama3-8b-instruct", EVAL_HF="none",
                EVAL_LONG_DOCUMENTS="none", EVAL_SHORT_DOCUMENTS="none",
                EVAL_RULER_TASKS="vt niah_single"),
     "EVAL_RULER_TASKS: unknown RULER task 'niah_single'; choose from: niah_single_1"),
    ("08", dict(EVAL_CHECKPOINTS="base=$WORK/checkpoints/llama3-8b-instruct", EVAL_HF="none",
                EVAL_LONG_DOCUMENTS="none", EVAL_SHORT_DOCUMENTS="none", EVAL_RULER_TASKS="vt",
                EVAL_RULER_CHAT=2),
     "EVAL_RULER_CHAT=2 must be 1 or 0"),
    ("04", dict(RECOMPUTE="some"), "RECOMPUTE=some must be none, selective or full"),
    ("04", dict(TINY=2), "TINY=2 must be 0 or 1"),
]


@pytest.mark.parametrize("stage,env,message", BAD_INPUT,
                         ids=[f"{s}-{next(iter(e), 'none')}" for s, e, _ in BAD_INPUT])
def test_bad_input_stops_with_exit_2_naming_it_before_anything_runs(fake_work, stage, env,
                                                                    message):
    before = sorted(p.relative_to(fake_work) for p in fake_work.rglob("*"))
    started = time.monotonic()
    env = {key: value.replace("$WORK", str(fake_work)) if isinstance(value, str) else value
           for key, value in env.items()}
    result = _run(_script(stage), **{"WORK": fake_work, **env})
    assert result.returncode == 2, result.stdout
    assert message in result.stdout and "error: examples/prolong/" in result.stdout
    assert "torch.distributed.run" not in result.stdout  # no launch was even printed
    assert sorted(p.relative_to(fake_work) for p in fake_work.rglob("*")) == before
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("name, content, message", [
    ("missing.yaml", None, "config file {path} does not exist: give the path of a YAML file"),
    ("broken.yaml", "data: {path: [1,\n", "{path}: not valid YAML"),
    ("list.yaml", "- a\n- b\n", "{path}: the top level must be a mapping of sections"),
    ("folder.yaml", "", "config file {path} is a directory: give a YAML file in it"),
])
def test_train_torchrun_refuses_a_bad_config_file_without_a_traceback(tmp_path, name, content,
                                                                      message):
    path = tmp_path / name
    if name == "folder.yaml":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    result = _run("examples/train_torchrun.sh", str(path))
    assert result.returncode == 2, result.stdout
    assert ("error: examples/train_torchrun.sh: " + message.format(path=path)) in result.stdout
    assert "Traceback" not in result.stdout and "torch.distributed.run" not in result.stdout


ODD_PATH = "a dir:with colon"  # a space and a colon, as WORK and RAW_DIR may hold


def test_stage_01_takes_folders_holding_spaces_and_colons(tmp_path):
    raw = tmp_path / ODD_PATH / "raw data"
    shutil.copytree(REPO / "data_tools" / "sample", raw)
    work = tmp_path / ODD_PATH / "work"
    result = _run(_script("01"), "--check", RAW_DIR=raw, WORK=work)
    assert result.returncode == 0, result.stdout
    for source, file in (("code-repos", "code.jsonl.zst"), ("docs", "docs.jsonl.gz")):
        line = next(line for line in result.stdout.splitlines() if f"/{source} " in line)
        assert shlex.split(line)[3:6] == [str(raw / file), "--output-prefix",
                                          str(work / "data" / "tokenized" / source)]
    downloads = {}
    for name in ("64K", "512K"):
        downloads[name] = tmp_path / ODD_PATH / f"prolong {name}"
        (downloads[name] / f"book-{name}").mkdir(parents=True)
    result = _run(_script("01"), "--check", DATA_FROM="prolong", WORK=work,
                  PROLONG_DATA_64K=downloads["64K"], PROLONG_DATA_512K=downloads["512K"])
    assert result.returncode == 0, result.stdout
    commands = [shlex.split(line) for line in result.stdout.splitlines()
                if line.startswith("lce-data import-mds")]
    assert [c[2:] for c in commands] == [
        [str(downloads[name] / f"book-{name}"), "--output-prefix",
         str(work / "data" / "tokenized" / f"prolong-{name}" / f"book-{name}")]
        for name in ("64K", "512K")]


def test_stage_08_takes_a_work_folder_holding_spaces_and_colons(tmp_path):
    """The default checkpoint and export lists stay whole under such a WORK: each refusal
    names the whole path, and the paths reach engine.evaluate whole."""
    work = tmp_path / ODD_PATH
    runs = ["llama3-8b-instruct", "prolong-stage1-64k", "prolong-stage2-512k"]
    for run in runs:
        (work / "checkpoints" / run).mkdir(parents=True)
        (work / "checkpoints" / run / "latest").write_text("step_00000000\n")
    settings = dict(WORK=work, EVAL_LONG_DOCUMENTS="none", EVAL_SHORT_DOCUMENTS="none")
    sft = work / "checkpoints" / "prolong-sft"
    result = _run(_script("08"), **settings)
    assert result.returncode == 2
    assert f"EVAL_CHECKPOINTS: no engine checkpoint at {sft} ('sft={sft}'" in result.stdout
    sft.mkdir()
    (sft / "latest").write_text("step_00000000\n")
    hf = work / "hf" / "prolong-8b-instruct"
    result = _run(_script("08"), **settings)
    assert result.returncode == 2
    assert f"EVAL_HF: no Hugging Face model at {hf} ('hf={hf}'" in result.stdout
    result = _run(_script("08"), EVAL_HF="none", **settings)
    assert result.returncode == 2  # the checkpoints are empty folders: engine.evaluate says so
    assert f"--checkpoint {work / 'checkpoints' / runs[0]}" in result.stdout
    assert "engine.evaluate refused the evaluation" in result.stdout


def test_a_bad_manifest_line_is_named_with_its_number(tmp_path):
    manifest = tmp_path / "sources.tsv"
    manifest.write_text("# source inputs key group min\n"
                        "docs docs.jsonl.gz text - -\n"
                        "code code.jsonl.zst text repo\n")
    result = _run(_script("01"), WORK=tmp_path / "work", MANIFEST=manifest)
    assert result.returncode == 2
    assert f"MANIFEST={manifest}:3: expected 5 columns" in result.stdout
    assert not (tmp_path / "work").exists()  # line 2 was not tokenized before line 3 failed


def _planner_overrides(*args) -> str:
    return subprocess.run(["python3", "-m", "engine.planner", "--overrides", *args], cwd=REPO,
                          capture_output=True, text=True, check=True,
                          env=recipe_env()).stdout.strip()


@pytest.mark.parametrize("stage,seq_length,batch,nodes", [
    ("04", 65536, 64, 8), ("05", 524288, 16, 8), ("05", 524288, 16, 16)])
def test_the_layout_is_the_planners_for_the_cluster(fake_work, stage, seq_length, batch, nodes):
    expected = _planner_overrides("--model", "llama3-8b", "--seq-length", str(seq_length),
                                  "--gpus", str(nodes * 8), "--gpu-memory-gb", "80",
                                  "--global-batch", str(batch), "--micro-batch", "1")
    assert re.fullmatch(r"parallel\.tensor_parallel=\d+ parallel\.pipeline_parallel=\d+ "
                        r"parallel\.context_parallel=\d+ .*parallel\.recompute=\w+", expected)
    result = _run(_script(stage), "--check", TINY=0, WORK=fake_work, NNODES=nodes,
                  NODE_RANK=3, MASTER_ADDR="node0", MASTER_PORT=29400)
    assert result.returncode == 0, result.stdout
    command = result.stdout
    assert f"-m engine.train --config {REPO}/engine/configs/" in command
    assert f" {expected} " in command  # every setting of the layout, as the planner gave them
    assert (f"--nnodes {nodes} --node-rank 3 --nproc-per-node 8 --rdzv-backend c10d "
            f"--rdzv-endpoint node0:29400") in command
    assert "is_host=false" in command  # node 3 joins the rendezvous node 0 hosts


def test_check_runs_the_dry_run_of_the_real_run(fake_work):
    result = run_command(["bash", _script("04"), "--check"], timeout=600,
                         env=recipe_env(TINY=0, DRY_RUN=1, WORK=fake_work, NNODES=8))
    assert result.returncode == 0, result.stdout
    # The planner's layout for 64 GPUs (its own test checks which), one pipeline stage.
    assert re.search(r"dry run: rank 0 \(first\+last pipeline stage\) of TP\d+ x PP1 x CP\d+ x "
                     r"DP\d+ .*, 64 x 65536 tokens per step", result.stdout), result.stdout
    assert "PREDICTION (not a measurement)" in result.stdout


@pytest.mark.parametrize("settings, address, port", [
    ({}, "localhost", "29500"),  # the scripts' defaults, which the environment does not hold
    ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29611"}, "127.0.0.1", "29611"),
], ids=["defaults", "set"])
def test_the_trainers_check_is_given_the_rendezvous_port_torchrun_will_listen_on(
        fake_work, tmp_path, settings, address, port):
    """engine.train --check checks that MASTER_PORT is free only if it is in its environment:
    the script's MASTER_ADDR and MASTER_PORT, defaults included, must reach it. A stand-in
    PYTHON records them and refuses the check (nothing is launched)."""
    python = tmp_path / "python"
    python.write_text(f"""#!/usr/bin/env bash
if [[ " $* " == *" --check "* ]]; then
  echo "check saw MASTER_ADDR=${{MASTER_ADDR-unset}} MASTER_PORT=${{MASTER_PORT-unset}}"
  exit 2
fi
exec {shlex.quote(shutil.which("python3"))} "$@"
""")
    python.chmod(0o755)
    result = _run(_script("04"), TINY=0, WORK=fake_work, PYTHON=python, TP=8, **settings)
    assert result.returncode == 2, result.stdout
    assert f"check saw MASTER_ADDR={address} MASTER_PORT={port}" in result.stdout, result.stdout
    assert "nothing was launched" in result.stdout


def test_tp_pp_cp_when_set_replace_the_planner(fake_work):
    result = _run(_script("05"), "--check", "optimizer.lr=3e-6", TINY=0, WORK=fake_work,
                  TP=2, CP=4, CP_ALGORITHM="ulysses", RECOMPUTE="selective", GLOBAL_BATCH=32,
                  TRAIN_STEPS=100)
    assert result.returncode == 0, result.stdout
    assert "layout as set (TP=2 PP=1 CP=4)" in result.stdout
    assert ("parallel.tensor_parallel=2 parallel.pipeline_parallel=1 "
            "parallel.context_parallel=4 parallel.cp_algorithm=ulysses "
            "parallel.recompute=selective data.global_batch=32 train_steps=100") in result.stdout
    assert "parallel.sequence_parallel=false" not in result.stdout
    # Overrides come last, so they win over the settings.
    assert result.stdout.rstrip().endswith(
        f"checkpoint.init_from={fake_work}/checkpoints/prolong-stage1-64k optimizer.lr=3e-6")


@pytest.mark.parametrize("script", ["04", "05", "06", "train_torchrun"])
def test_verbose_reaches_the_training_run_of_every_training_launcher(fake_work, tmp_path,
                                                                     script):
    if script == "train_torchrun":
        args = ("examples/train_torchrun.sh", f"{REPO}/engine/configs/prolong-stage1-64k.yaml",
                "--check", f"data.path={fake_work}/data/packed/stage1",
                f"checkpoint.dir={tmp_path}/run")
    else:
        args = (_script(script), "--check")
    # 06 packs its chat data first (--check: printed only).
    settings = dict(TINY=0, WORK=fake_work, TP=8, SFT_DATA=REPO / "data_tools" / "sample" /
                    "chat.jsonl", TOKENIZER=REPO / "data_tools" / "sample")
    result = _run(*args, **settings, VERBOSE=1)
    assert result.returncode == 0, result.stdout
    assert " -m engine.train --verbose --config " in result.stdout
    result = _run(*args, **settings, VERBOSE="on")
    assert result.returncode == 2 and "VERBOSE=on must be 0 or 1" in result.stdout


def test_shellcheck_passes_on_every_script():
    require(shutil.which("shellcheck") is not None, "shellcheck is not installed")
    scripts = sorted(str(p) for p in (REPO / "examples").rglob("*")
                     if p.suffix in (".sh", ".sbatch"))
    scripts += [str(REPO / "tests" / "run.sh"), str(REPO / ".ci" / "run"),
                str(REPO / ".ci" / "newest_megatron.sh"),
                str(REPO / ".ci" / "lm_eval_handoff.sh"), str(REPO / ".ci" / "cached_venv.sh")]
    # No --shell: each file must name its shell itself (a shebang, or a directive in the
    # sourced common.sh), as shellcheck run on that one file needs.
    result = subprocess.run(["shellcheck", *scripts], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    assert len(scripts) >= 14 and str(REPO / "examples" / "common.sh") in scripts


SBATCH = "examples/train_slurm.sbatch"


@pytest.mark.parametrize("args,env,message", [
    ((), {}, "submit it with sbatch (SLURM_JOB_ID is not set)"),
    ((), {"SLURM_JOB_ID": "7"}, "usage: sbatch [options] examples/train_slurm.sbatch"),
    (("examples/prolong/09_missing.sh",), {"SLURM_JOB_ID": "7"}, "no launcher script"),
    (("notes.txt",), {"SLURM_JOB_ID": "7"}, "notes.txt is neither a launcher script (.sh) nor"),
])
def test_the_sbatch_wrapper_refuses_what_it_cannot_launch(args, env, message):
    result = run_command(["bash", SBATCH, *args], timeout=30, env=recipe_env(**env))
    assert result.returncode == 2, result.stdout
    assert f"error: train_slurm.sbatch: {message}" in result.stdout


def test_the_sbatch_wrapper_without_the_slurm_commands_says_so(tmp_path):
    """SLURM_JOB_ID set where scontrol is not (a job's environment copied to another shell):
    exit 2 naming the missing command, not 127 "command not found"."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "bash").symlink_to(shutil.which("bash"))
    env = recipe_env(SLURM_JOB_ID="7", SLURM_NNODES="1", SLURM_JOB_NODELIST="node0",
                     PATH=str(tmp_path / "bin"))
    result = run_command([str(tmp_path / "bin" / "bash"), SBATCH,
                          "examples/prolong/04_train_stage1_64k.sh"], timeout=30, env=env)
    assert result.returncode == 2, result.stdout
    assert (f"error: train_slurm.sbatch: SLURM_JOB_ID=7 is set but 'scontrol' is not on PATH "
            f"({tmp_path / 'bin'})") in result.stdout


def test_the_generic_launcher_takes_the_configs_layout_and_checks_its_data(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model: {name: tiny}\nparallel: {tensor_parallel: 2, "
                      "pipeline_parallel: 2}\ndata: {path: " + str(tmp_path / "packed") + "}\n"
                      "checkpoint: {dir: " + str(tmp_path / "run") + "}\n")
    script = "examples/train_torchrun.sh"
    assert run_command(["bash", script], timeout=30, env=recipe_env()).returncode == 2
    result = _run(script, str(config), "--check")
    assert result.returncode == 2
    assert f"no packed dataset at data.path={tmp_path}/packed (no packed.json)" in result.stdout
    (tmp_path / "packed").mkdir()
    (tmp_path / "packed" / "packed.json").write_text(json.dumps({"seq_length": 256}))
    result = _run(script, str(config), "--check", "optimizer.lr=1e-4", GPUS_PER_NODE=8)
    assert result.returncode == 0, result.stdout
    assert "layout as set (TP=2 PP=2 CP=1)" in result.stdout
    assert "--nproc-per-node 8" in result.stdout
    assert result.stdout.rstrip().endswith(f"--config {config} parallel.tensor_parallel=2 "
                                           "parallel.pipeline_parallel=2 "
                                           "parallel.context_parallel=1 optimizer.lr=1e-4")


def test_prolong_released_data_is_imported_and_mixed_by_01_and_02(tmp_path):
    """DATA_FROM=prolong: 01 imports every source folder of both downloads (MDS shards written
    by mosaicml-streaming's MDSWriter, tests/data_tools/fixtures/mds), 02 mixes them."""
    fixture = REPO / "tests" / "data_tools" / "fixtures" / "mds" / "fineweb-edu"
    downloads = {}
    for name in ("64K", "512K"):
        downloads[name] = tmp_path / f"prolong-data-{name}"
        shutil.copytree(fixture, downloads[name] / "fineweb-edu")
    work = tmp_path / "work"
    env = dict(TINY=0, WORK=work, DATA_FROM="prolong", PROLONG_DATA_64K=downloads["64K"],
               PROLONG_DATA_512K=downloads["512K"])
    result = _run(_script("01"), **env)
    assert result.returncode == 0, result.stdout
    for name in ("64K", "512K"):
        summary = json.loads((work / "data" / "tokenized" / f"prolong-{name}" /
                              "fineweb-edu.summary.json").read_text())
        assert (summary["parts"], summary["samples"]) == (["proc00-64", "proc01-64"], 14)
    again = _run(_script("01"), **env)
    assert again.returncode == 0 and again.stdout.count("kept ") == 2
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: released\nseq_length: 128\nseed: 1\nsources:\n"
                      "  - {name: fw, path: fineweb-edu, weight: 1.0, prepacked: true}\n")
    # Stage 1 sized by its engine config (steps x global batch); stage 2 by the recipe alone.
    train = tmp_path / "train.yaml"
    train.write_text("train_steps: 5\ndata: {global_batch: 2}\n")
    result = _run(_script("02"), **env, STAGE1_RECIPE=recipe, STAGE2_RECIPE=recipe,
                  STAGE1_CONFIG=train, STAGE2_CONFIG="none")
    assert result.returncode == 0, result.stdout
    for stage, sequences in (("stage1", 5 * 2), ("stage2", 14)):
        packed = json.loads((work / "data" / "packed" / stage / "packed.json").read_text())
        assert packed["num_sequences"] == sequences and packed["seq_length"] == 128
