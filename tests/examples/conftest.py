"""Fixtures for the launcher tests: the TINY=1 recipe's data and imported model, built once by
the recipe's own scripts (examples/prolong/01-03)."""
import json

import pytest

from tests.distributed import run_command
from tests.examples.system import recipe_env

PREPARE = ("examples/prolong/01_prepare_data.sh", "examples/prolong/02_build_mixtures.sh",
           "examples/prolong/03_import_model.sh")


def read_metrics(run_dir) -> dict[int, dict]:
    """metrics.jsonl of a run, appended over launches: the last record of each step."""
    rows = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]
    return {row["step"]: row for row in rows}


@pytest.fixture(scope="session")
def tiny_work(tmp_path_factory):
    """WORK of a TINY=1 recipe after 01-03: sample corpus tokenized, both mixtures packed, a
    random Llama-3-vocabulary model imported. Checks what each script wrote."""
    work = tmp_path_factory.mktemp("prolong-tiny")
    env = recipe_env(WORK=work)
    for script in PREPARE:
        result = run_command(["bash", script], timeout=300, env=env)
        assert result.returncode == 0, f"{script} failed:\n{result.stdout[-4000:]}"
    tokenized = work / "data" / "tokenized"
    code = json.loads((tokenized / "code-repos.summary.json").read_text())
    docs = json.loads((tokenized / "docs.summary.json").read_text())
    # The sample corpus with Llama-3's tokenizer (data_tools/sample/README.md).
    assert (code["documents"], code["tokens"], code["group_by"]) == (18, 516_467, "repo")
    assert (docs["documents"], docs["tokens"]) == (79, 105_748)
    for stage, length in (("stage1", 128), ("stage2", 512)):
        packed = json.loads((work / "data" / "packed" / stage / "packed.json").read_text())
        assert packed["seq_length"] == length and packed["num_sequences"] > 100
    state = json.loads(
        (work / "checkpoints" / "llama3-8b-instruct" / "step_00000000" / "engine_state.json")
        .read_text())
    assert state["weights_only"] and state["model_config"]["rope_base"] == 8e6
    assert state["model_config"]["vocab_size"] == 128_256
    return work
