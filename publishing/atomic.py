"""Write-then-rename, the one implementation: an output appears under its name only complete.

    write_text_atomically(path, text)          # summaries, pointers, small JSON files
    tmp = temporary_path(final); ...; publish(tmp, final)   # files written piece by piece
    with staged_directory(final) as tmp: ...   # a folder filled, then renamed into place
    publish_directory(tmp, final)              # the same, when others filled ``tmp`` (ranks)

Temporary names carry the process id, so two writers never share one; a failure removes what
was staged and leaves any earlier output at the final name untouched. Both data_tools and the
engine (checkpoints, conversions) use these; only the standard library is imported.
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from typing import Iterator, Optional


def temporary_path(final: str | os.PathLike) -> str:
    """The name ``final`` is written under before ``publish``: FINAL.tmpPID."""
    return f"{os.fspath(final)}.tmp{os.getpid()}"


def publish(temporary: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename a complete file into place (atomic on one file system)."""
    os.replace(temporary, final)


def discard(*paths: str | os.PathLike) -> None:
    """Remove staged files or folders that will not be published (missing ones are fine)."""
    for path in paths:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.remove(path)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    temporary = temporary_path(path)
    try:
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text)
        publish(temporary, path)
    except BaseException:
        discard(temporary)
        raise


def publish_directory(temporary: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move a complete folder to ``final``, replacing a folder already there: the old one is
    renamed aside first and deleted after, so ``final`` is never a mix of the two."""
    final = os.fspath(final)
    if os.path.exists(final):
        old = f"{final.rstrip(os.sep)}.old{os.getpid()}"
        os.replace(final, old)
        os.replace(temporary, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(temporary, final)


@contextmanager
def staged_directory(final: str | os.PathLike,
                     temporary: Optional[str | os.PathLike] = None) -> Iterator[str]:
    """A fresh temporary folder to fill (``temporary``, default FINAL.tmpPID beside ``final``);
    published to ``final`` if the block succeeds, removed if it fails."""
    temporary = os.fspath(temporary) if temporary is not None else temporary_path(
        os.fspath(final).rstrip(os.sep))
    if os.path.exists(temporary):
        shutil.rmtree(temporary)  # debris of an interrupted run
    os.makedirs(temporary)
    try:
        yield temporary
        publish_directory(temporary, final)
    except BaseException:
        discard(temporary)
        raise
