"""engine.recipe: the scripts' settings table (defaults at TINY=0 and TINY=1, defaults derived
from other settings, the environment winning) and the source manifest of stage 01 (each bad
line named by its number, before anything runs)."""
import pytest

from engine.recipe.settings import SETTINGS, STAGES, SettingError, resolve, stage_settings
from engine.recipe.stages import read_manifest

REPO = "/checkout"


def test_defaults_at_tiny_0_and_1_and_derived_from_other_settings():
    full = resolve("sft", REPO, {})
    assert (full["WORK"], full["GPUS_PER_NODE"], full["GPU_MEMORY_GB"], full["DRY_RUN"]) == (
        "runs/prolong", "8", "80", "1")
    assert (full["SFT_SEQ_LENGTH"], full["SFT_DATA"], full["HF_MODEL"]) == ("65536", "", "")
    assert full["CONFIG"] == f"{REPO}/engine/configs/prolong-sft.yaml"
    assert full["RDZV_ID"] == "longctx" and full["TOKENIZER"] == full["HF_MODEL"]
    tiny = resolve("sft", REPO, {"TINY": "1"})
    assert (tiny["WORK"], tiny["GPUS_PER_NODE"], tiny["GPU_MEMORY_GB"], tiny["DRY_RUN"]) == (
        "runs/prolong-tiny", "2", "4", "0")
    assert (tiny["SFT_SEQ_LENGTH"], tiny["HF_MODEL"]) == ("512", "runs/prolong-tiny/hf-tiny-llama3")
    assert tiny["SFT_DATA"] == f"{REPO}/data_tools/sample/chat.jsonl"
    # Derived defaults follow the settings they name, given or not.
    given = resolve("sft", REPO, {"WORK": "/w", "CKPT_ROOT": "/c", "SLURM_JOB_ID": "42"})
    assert (given["PACKED_DIR"], given["SFT_CKPT"], given["RDZV_ID"]) == (
        "/w/data/packed", "/c/prolong-sft", "42")
    # An empty variable is unset, as ${NAME:-default} reads it.
    assert resolve("sft", REPO, {"WORK": ""})["WORK"] == "runs/prolong"


def test_each_stage_has_its_own_config_and_recipes_follow_data_from():
    configs = {stage: resolve(stage, REPO, {})["CONFIG"]
               for stage in ("train-stage1", "train-stage2", "sft")}
    assert configs == {stage: f"{REPO}/engine/configs/{name}.yaml" for stage, name in (
        ("train-stage1", "prolong-stage1-64k"), ("train-stage2", "prolong-stage2-512k"),
        ("sft", "prolong-sft"))}
    raw = resolve("build-mixtures", REPO, {})
    released = resolve("build-mixtures", REPO, {"DATA_FROM": "prolong"})
    assert raw["STAGE2_RECIPE"] == f"{REPO}/data_tools/recipes/prolong-stage2-512k-raw.yaml"
    assert released["STAGE2_RECIPE"] == f"{REPO}/data_tools/recipes/prolong-stage2-512k.yaml"
    assert resolve("build-mixtures", REPO, {"TINY": "1"})["STAGE1_CONFIG"] == "none"


@pytest.mark.parametrize("environ, message", [
    ({"TINY": "2"}, "TINY=2 must be 0 or 1"),
    ({"DATA_FROM": "hf"}, "DATA_FROM=hf must be raw or prolong"),
])
def test_a_bad_tiny_or_data_from_is_refused(environ, message):
    with pytest.raises(SettingError, match=message):
        resolve("prepare-data", REPO, environ)


def test_every_stage_lists_its_settings_once_with_a_description():
    for stage in STAGES:
        names = [setting.name for setting in stage_settings(stage)]
        assert len(names) == len(set(names)), stage
        assert names[-2:] == ["TINY", "PYTHON"]
    assert all(setting.description for setting in SETTINGS)


def _manifest(tmp_path, text):
    (tmp_path / "raw").mkdir(exist_ok=True)
    for name in ("a.jsonl", "b1.jsonl", "b2.jsonl"):
        (tmp_path / "raw" / name).write_text("{}\n")
    path = tmp_path / "sources.tsv"
    path.write_text(text)
    return str(path)


def test_the_manifest_gives_each_source_its_matched_inputs(tmp_path):
    manifest = _manifest(tmp_path, "# source inputs key group min\n\n"
                                   "a a.jsonl text - -   # one file\n"
                                   f"b b*.jsonl,{tmp_path}/raw/a.jsonl content repo 100\n")
    sources = read_manifest(manifest, str(tmp_path / "raw"))
    assert [(s.name, s.json_key, s.group_by, s.min_tokens) for s in sources] == [
        ("a", "text", "-", "-"), ("b", "content", "repo", "100")]
    assert sources[1].inputs == [str(tmp_path / "raw" / name)
                                 for name in ("b1.jsonl", "b2.jsonl", "a.jsonl")]


@pytest.mark.parametrize("line, message", [
    ("c c.jsonl text repo", "expected 5 columns (source, inputs, json_key, group_by, "
                            "min_tokens; '-' for none), got: c c.jsonl text repo"),
    ("c a.jsonl text - - extra", "expected 5 columns"),
    ("c/d a.jsonl text - -", "source name 'c/d' must be letters, digits, '.', '_' or '-'"),
    ("c a.jsonl text - many", "min_tokens 'many' must be a number or '-'"),
    ("c none*.jsonl text - -", "'{raw}/none*.jsonl' matches no file (source c)"),
])
def test_a_bad_manifest_line_is_named_by_its_number(tmp_path, line, message):
    manifest = _manifest(tmp_path, "# comment\na a.jsonl text - -\n" + line + "\n")
    message = message.format(raw=tmp_path / "raw")
    with pytest.raises(SettingError) as error:
        read_manifest(manifest, str(tmp_path / "raw"))
    assert str(error.value).startswith(f"MANIFEST={manifest}:3: ")
    assert message in str(error.value)


def test_a_manifest_of_comments_only_lists_no_source(tmp_path):
    manifest = _manifest(tmp_path, "# nothing\n\n")
    with pytest.raises(SettingError, match="lists no source"):
        read_manifest(manifest, str(tmp_path / "raw"))


def test_the_launch_settings_are_engine_launchs_with_the_recipes_defaults():
    """engine.launch reads its settings from the table's launch group, each with the table's
    default but for the two the scripts choose otherwise (RDZV_ID: the job id; DRY_RUN: --check
    runs the full-size run's dry run)."""
    from engine import launch

    table = {s.name: s.default for s in SETTINGS if s.group == "launch"}
    assert list(table) == list(launch.SETTINGS)
    differing = {name for name, default in table.items() if launch.SETTINGS[name] != default}
    assert differing == {"RDZV_ID", "DRY_RUN"}
