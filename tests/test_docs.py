"""The documentation cannot drift from the repository: docs/configuration.md is exactly what the
config classes declare, and every file or folder the README and docs/ name exists."""
import re
import subprocess
import sys

import pytest

from engine import config_doc
from tests.distributed import REPO

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Markdown links to repository files: [text](relative/path) or [text](relative/path#anchor).
LINK = re.compile(r"\]\((?!https?://|#|mailto:)([^)\s#]+)")
# Code spans that look like repository paths: a known top-level folder, then a path.
TOP_LEVEL = ("bench", "csrc", "data_tools", "docs", "engine", "examples", "tests", ".ci")
PATH_SPAN = re.compile(r"`((?:%s)/[A-Za-z0-9_./-]*)`" % "|".join(re.escape(t) for t in TOP_LEVEL))


def test_configuration_reference_matches_the_config_classes():
    written = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert written == config_doc.render(), (
        "docs/configuration.md differs from the config classes: run "
        "python -m engine.config_doc and commit the result")


def test_configuration_reference_lists_every_key():
    from engine.training.config import TrainConfig

    written = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    expected = set(_dotted_keys(TrainConfig))
    listed = set(re.findall(r"^\| `([a-z0-9_.]+)` \|", written, re.M))
    assert listed == expected, (f"missing: {sorted(expected - listed)}; "
                                f"extra: {sorted(listed - expected)}")


def _dotted_keys(cls, prefix=""):
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in getattr(cls, "DERIVED", ()):
            continue  # computed from the world size; load_config refuses it
        if dataclasses.is_dataclass(hints[field.name]):
            yield from _dotted_keys(hints[field.name], f"{prefix}{field.name}.")
        else:
            yield prefix + field.name


def test_generator_check_mode_reports_a_stale_file(tmp_path):
    stale = tmp_path / "configuration.md"
    stale.write_text(config_doc.render().replace("| `optimizer.lr` | float |",
                                                 "| `optimizer.lr` | int |"))
    result = subprocess.run([sys.executable, "-m", "engine.config_doc", "--check",
                             "--out", str(stale)], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "out of date" in result.stderr


def test_aliases_name_real_settings_of_their_commands():
    # The launch scripts, or a Python launcher they call.
    launchers = [p for p in (REPO / "examples").rglob("*")
                 if p.is_file() and p.suffix in (".sh", ".sbatch", ".py", "")]
    engine = [p for p in (REPO / "engine").rglob("*.py") if p.name != "config_doc.py"]
    sources = "\n".join(p.read_text() for p in [*launchers, *engine])
    for key, name in config_doc.ENV_ALIASES.items():
        # Read as a shell variable ($NAME, ${NAME...}) or by name from the environment ("NAME").
        read = rf"\$\{{?{name}\b|[\"']{name}[\"']"
        assert re.search(read, sources), f"{key}'s alias {name} is read by no launcher"
    evaluate = "\n".join(p.read_text() for p in (REPO / "engine" / "evaluate").rglob("*.py"))
    for key, (_, flag) in config_doc.CLI_ALIASES.items():
        assert f'"{flag}"' in evaluate, f"{key}'s alias {flag} is not a flag of engine.evaluate"


def _named_paths(document):
    """(path as written, where it must be) for each link and each path-like code span."""
    text = document.read_text(encoding="utf-8")
    for match in LINK.finditer(text):
        yield match.group(1), document.parent / match.group(1)
    for match in PATH_SPAN.finditer(text):
        yield match.group(1), REPO / match.group(1)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_named_path_exists(document):
    missing = []
    for name, target in sorted(set(_named_paths(document))):
        # Globs and placeholders stand for files a run writes (step_*, {a,b}): not checked.
        if any(c in name for c in "*{}<>$"):
            continue
        if not target.exists():
            missing.append(name)
    assert not missing, f"{document.relative_to(REPO)} names paths that do not exist: {missing}"
