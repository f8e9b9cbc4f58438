"""What both directions share about their output: atomic publication, dtype names, peak memory."""
from __future__ import annotations

import resource
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from data_tools.outputs import OutputError, check_output_location
from engine.convert.hf_mapping import ConversionError
from publishing.atomic import staged_directory

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def check_new_folder(out: Path) -> None:
    """``out`` can be created as a new folder: nothing there yet (or an empty folder), its
    parents folders, and they writable."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"--out {out} exists and is not empty; choose a new folder or "
                              f"remove it")
    try:
        check_output_location(str(out), "--out")
    except OutputError as error:
        raise ConversionError(str(error)) from None


@contextmanager
def staged_folder(out: Path, purpose: str) -> Iterator[Path]:
    """A temporary sibling of ``out`` to fill; renamed to ``out`` only if the block succeeds.

    An interrupted or failed conversion leaves at most ``.NAME.tmp-PURPOSE`` (removed by the
    next attempt), never a folder at ``out`` that looks complete.
    """
    check_new_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with staged_directory(out, out.parent / f".{out.name}.tmp-{purpose}") as tmp:
        yield Path(tmp)
