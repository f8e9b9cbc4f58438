"""What both directions share about their output: atomic publication, dtype names, peak memory."""
from __future__ import annotations

import errno
import os
import resource
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch

from data_tools.outputs import OutputError, check_output_location, write_failure
from engine.checkpoint import os_error_behind
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
    A write that fails there (a full disk, a quota, a file-size limit) is a ConversionError
    naming the file under ``out`` and the fix; the temporary folder is removed first.
    """
    check_new_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.parent / f".{out.name}.tmp-{purpose}"
    try:
        with staged_directory(out, temporary) as tmp:
            yield Path(tmp)
    except BaseException as error:
        if isinstance(error, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        # torch's checkpoint writer wraps the OSError of its writing thread (import).
        cause = os_error_behind(error)
        written = _under(cause, temporary, out) if cause is not None else None
        if written is None:
            raise
        raise ConversionError(f"--out {out}: {write_failure(written, cause)}") from error


# Failures of a write that name no file (a failed write() call): the file being written is in
# the staged folder, the only place a conversion writes.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def _under(cause: OSError, temporary: Path, out: Path) -> Optional[str]:
    """Where the file whose write failed would have been published (under ``out``), or None
    if ``cause`` is not a failed write into the staged folder."""
    if cause.filename is None:
        return str(out) if cause.errno in _WRITE_ERRNOS else None
    path = Path(os.path.abspath(cause.filename))
    staged = Path(os.path.abspath(temporary))
    if path != staged and staged not in path.parents:
        return None
    return str(out / path.relative_to(staged))
