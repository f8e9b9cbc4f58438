"""`python -m engine.recipe --repo REPO --script SCRIPT STAGE [--help | --check | section.key=value
...]`: run one stage of the recipe as its script in examples/ (which passes itself as SCRIPT)
does. Settings are environment variables (SCRIPT --help lists each); a bad one stops the stage
with exit code 2 naming it, before any process starts or anything is written."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.launch import LaunchSettingError
from engine.recipe import stages
from engine.recipe.settings import STAGES, SettingError, help_text, resolve

OPTIONS = "Options: --help (this), --check (validate and print the commands, run nothing)"


def header_comment(script: Path) -> str:
    """The script's usage: its comment lines after the shebang, up to the first other line
    (shellcheck directives left out)."""
    lines = []
    for line in script.read_text().splitlines()[1:]:
        if not line.startswith("#"):
            break
        if not line.startswith("# shellcheck"):
            lines.append(line[2:] if line.startswith("# ") else line[1:])
    return "\n".join(lines)


def usage(stage: str, script: Path, values: dict) -> str:
    return f"{header_comment(script)}\n\n{OPTIONS}\n{help_text(stage, values)}\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.recipe", description=__doc__,
                                     add_help=True)
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--repo", required=True, help="the checkout the scripts live in")
    parser.add_argument("--script", required=True, help="the calling script")
    parser.add_argument("arguments", nargs=argparse.REMAINDER,
                        help="the script's own arguments")
    args = parser.parse_args(argv)
    repo = Path(args.repo).resolve()
    script = Path(args.script).resolve()
    name = str(script.relative_to(repo)) if script.is_relative_to(repo) else str(script)

    def die(message: str) -> int:
        print(f"error: {name}: {message}", file=sys.stderr, flush=True)
        return 2

    try:
        values = resolve(args.stage, str(repo))
    except SettingError as error:
        return die(str(error))
    arguments = list(args.arguments)
    config = None
    if args.stage == "train":
        first = arguments[0] if arguments else ""
        if first in ("-h", "--help"):
            print(usage(args.stage, script, values), end="")
            return 0
        if not first or first.startswith("-"):
            print(usage(args.stage, script, values), end="", file=sys.stderr)
            return 2
        config = arguments.pop(0)
    runner, takes_overrides = stages.STAGE_RUNNERS.get(args.stage, (None, True))
    stage = stages.Stage(name, str(repo), values)
    for arg in arguments:
        if arg in ("-h", "--help"):
            print(usage(args.stage, script, values), end="")
            return 0
        if arg == "--check":
            stage.check = True
        elif "=" in arg and takes_overrides:
            stage.overrides.append(arg)
        elif "=" in arg:
            return die(f"unexpected argument '{arg}': settings are environment variables (see "
                       f"--help)")
        else:
            return die(f"unknown argument '{arg}' (--help lists the settings)")
    try:
        status = stages.train_any(stage, config) if config is not None else runner(stage)
    except (SettingError, LaunchSettingError) as error:
        return die(str(error))
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
