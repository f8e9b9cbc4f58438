"""Reading a JSON file that must hold one object, the one implementation: a file that cannot be
read, is not JSON, or holds a list or a number is an error naming the file, what is wrong and
``fix``, raised as the caller's own error type (its command turns that into exit code 2).

    config = read_json_object(path, "download it again", TokenizerError)

Both data_tools and the engine (checkpoints, conversions, evaluation) use it; only the standard
library is imported.
"""
from __future__ import annotations

import json
import os
from typing import Callable


def read_json_object(path: str | os.PathLike, fix: str,
                     error: Callable[[str], Exception] = ValueError) -> dict:
    """The object in JSON file ``path``; otherwise ``error(message)`` is raised, the message
    naming ``path``, the problem and ``fix`` (what the user should do about it)."""
    try:
        with open(path, encoding="utf-8") as file:
            value = json.load(file)
    except (ValueError, UnicodeDecodeError) as problem:
        raise error(f"{path} is not valid JSON ({problem}); {fix}") from None
    except OSError as problem:
        raise error(f"{path} cannot be read ({problem.strerror or problem}); check that it is a "
                    f"readable file, or {fix}") from None
    if not isinstance(value, dict):
        raise error(f"{path} holds a JSON {type(value).__name__}, not a JSON object; {fix}")
    return value
