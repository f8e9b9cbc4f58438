"""Writes docs/configuration.md, the reference of every training-config key, from the config
dataclasses themselves (``TrainConfig`` and every section it holds).

    python -m engine.config_doc            # rewrite docs/configuration.md
    python -m engine.config_doc --check    # exit 1 if the file differs from the classes

Everything is read from the classes: a section is a field whose type is a dataclass; a key's
type and default are its field's; its range comes from the class's ``RANGES``/``HIGHEST``
tables (the ones ``load_config`` enforces); its description is the comment above or beside the
field, the section's the class docstring. Choices come from a field's ``metadata["choices"]`` or
the class's ``CHOICES`` table where a class declares them, else from ``DECLARED_CHOICES`` below:
the constants the run plan validates those keys against. Aliases come from where they are
read: the launch's environment variables (engine.launch) and the evaluation measures' flags
(engine.evaluate.measures), which is why this module sits above both in the layers. A test
keeps the file equal to what this module produces, so a new or changed setting cannot leave the
reference behind.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import sys
import textwrap
import tokenize
import typing
from pathlib import Path

from engine.model.config import MODEL_CONFIGS
from engine.model.kernel_choices import FIELD_CHOICES, PRESETS
from engine.parallel.layout import CP_ALGORITHMS, RECOMPUTE_MODES
from engine.evaluate.measures import measures
from engine.launch import LAYOUT_SETTINGS, TRAIN_SETTINGS
from engine.training.config import TrainConfig, _type_name
from engine.training.data import POSITION_MODES

OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"

# Keys whose allowed values are declared where they are validated, not on the field.
DECLARED_CHOICES = {
    "model.name": tuple(MODEL_CONFIGS),
    "parallel.cp_algorithm": CP_ALGORITHMS,
    "parallel.recompute": RECOMPUTE_MODES,
    "data.position_mode": POSITION_MODES,
}
# Mapping-valued keys: what their keys are and what each accepts.
DECLARED_MAPPINGS = {
    "kernels": ("a model part, or `all` (" + ", ".join(PRESETS) + ") to set every part first",
                FIELD_CHOICES),
    "model.overrides": ("a field of the model config (engine/model/config.py `LlamaConfig`)", None),
}
# Environment variables of the recipe's launch scripts (examples/) that set a key.
ENV_ALIASES = {key: name for name, key in {**LAYOUT_SETTINGS, **TRAIN_SETTINGS}.items()}
# Command-line flags that set a key: (command, flag). --protocol is the command's own option
# (which measures run); every other flag is a measure's.
CLI_ALIASES = {"eval.protocol": ("python -m engine.evaluate", "--protocol")}
CLI_ALIASES.update({f"eval.{flag.key}": ("python -m engine.evaluate", flag.flag)
                    for measure in measures(None) for flag in measure.flags})


@dataclasses.dataclass(frozen=True)
class Key:
    name: str
    type: str
    default: str
    allowed: str
    aliases: str
    description: str


def _field_comments(cls) -> dict[str, str]:
    """The comment lines directly above each field of ``cls`` and the comment beside it."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = (token.start[1], token.string.lstrip("#").strip())
    lines = source.splitlines()
    names = {f.name for f in dataclasses.fields(cls)}
    found = {}
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        name = stripped.split(":", 1)[0]
        at_field_level = line.startswith("    ") and not line.startswith("     ")
        if name not in names or name in found or not at_field_level:
            continue
        above = []
        previous = number - 1
        while previous in comments and lines[previous - 1].strip().startswith("#"):
            above.insert(0, comments[previous][1])
            previous -= 1
        beside = [comments[number][1]] if number in comments else []
        found[name] = " ".join(above + beside)
    return found


def _default(field: dataclasses.Field) -> object:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _show(value) -> str:
    if value is dataclasses.MISSING:
        return "(required)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"' if value else '""'
    if isinstance(value, (list, tuple)):
        return "[]" if not value else "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{k}: {_show(v)}" for k, v in value.items())
        return "{" + items + "}"
    return repr(value) if isinstance(value, float) else str(value)


def _allowed(cls, field: dataclasses.Field, dotted: str) -> str:
    parts = []
    choices = (field.metadata.get("choices") or getattr(cls, "CHOICES", {}).get(field.name)
               or DECLARED_CHOICES.get(dotted))
    if choices:
        parts.append(" \\| ".join(f"`{choice}`" for choice in choices))
    lowest, strict = getattr(cls, "RANGES", {}).get(field.name, (None, False))
    if lowest is not None:
        parts.append(f"{'>' if strict else '>='} {lowest:g}")
    highest = getattr(cls, "HIGHEST", {}).get(field.name)
    if highest is not None:
        parts.append(f"<= {highest:.15g}")
    if dotted in DECLARED_MAPPINGS:
        what, per_key = DECLARED_MAPPINGS[dotted]
        parts.append(f"keys: {what}")
        for key, values in (per_key or {}).items():
            parts.append(f"`{key}`: " + " \\| ".join(f"`{v}`" for v in values))
    return "; ".join(parts)


def _aliases(dotted: str) -> str:
    parts = []
    if dotted in ENV_ALIASES:
        parts.append(f"env `{ENV_ALIASES[dotted]}`")
    if dotted in CLI_ALIASES:
        command, flag = CLI_ALIASES[dotted]
        parts.append(f"`{flag}` ({command.split()[-1]})")
    return ", ".join(parts)


def collect(cls=TrainConfig, prefix: str = "") -> list[tuple[str, object, list[Key]]]:
    """(section name, section class, its keys) for ``cls`` and every nested section, in
    declaration order; the top-level keys come first under the name ""."""
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    keys, nested = [], []
    for field in dataclasses.fields(cls):
        if field.name in getattr(cls, "DERIVED", ()):
            continue  # computed by the engine, not a key a config may set
        hint = hints[field.name]
        dotted = prefix + field.name
        if dataclasses.is_dataclass(hint):
            nested.extend(collect(hint, dotted + "."))
            continue
        type_name = "any" if hint is typing.Any else _type_name(hint)
        keys.append(Key(dotted, type_name, _show(_default(field)), _allowed(cls, field, dotted),
                        _aliases(dotted), comments.get(field.name, "")))
    return [(prefix.rstrip("."), cls, keys), *nested]


def _cell(text: str) -> str:
    return text.replace("|", "\\|") if "\\|" not in text else text


def render() -> str:
    sections = collect()
    known = {key.name for _, _, keys in sections for key in keys}
    for table in (DECLARED_CHOICES, DECLARED_MAPPINGS, ENV_ALIASES, CLI_ALIASES):
        missing = sorted(set(table) - known)
        if missing:
            raise KeyError(f"engine/training/config_doc.py names config keys that do not exist: "
                           f"{', '.join(missing)}; update its tables")
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m engine.config_doc` from the config classes in",
        "engine/training/config.py; do not edit by hand (a test compares them). -->",
        "",
        "A run's configuration is one or more YAML files (`--config`, merged in order) and",
        "`section.key=value` overrides on the command line, applied last and parsed as YAML.",
        "Every key, type and range below is checked before any process group exists; a bad value",
        "stops the command with exit code 2 naming the key and the fix. `engine/configs/` holds",
        "the recipe's configs. The recipe's launch scripts also read the environment variables",
        "listed under *aliases* (see docs/recipe.md); `python -m engine.evaluate` takes the flags",
        "listed there.",
        "",
    ]
    for name, cls, keys in sections:
        if not keys:
            continue
        out.append(f"## `{name}`" if name else "## Top level")
        out.append("")
        doc = inspect.getdoc(cls) or ""
        if doc and not doc.startswith(cls.__name__ + "("):
            out.extend([*textwrap.wrap(" ".join(doc.split()), 100), ""])
        out.append("| key | type | default | allowed | aliases | meaning |")
        out.append("|---|---|---|---|---|---|")
        for key in keys:
            out.append(f"| `{key.name}` | {key.type} | `{key.default}` | {_cell(key.allowed)} | "
                       f"{key.aliases} | {_cell(key.description)} |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.config_doc",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if docs/configuration.md differs from the config classes")
    parser.add_argument("--out", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is out of date: run python -m engine.config_doc",
                  file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
