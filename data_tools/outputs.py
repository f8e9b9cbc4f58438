"""Checks made before a command writes anything: can its output path be written at all, and is
what it would write worth writing (not empty)."""
from __future__ import annotations

import errno
import os
import tempfile
from typing import Sequence


class OutputError(ValueError):
    """An output that cannot or should not be written; the message names the path and the fix."""


def check_output_location(path: str, option: str, file_suffixes: Sequence[str] = ()) -> None:
    """Raise OutputError unless files can be created where `path` goes, before any is written.

    `path` is a dataset prefix (`file_suffixes` given: PATH + suffix are the files) or a folder
    (no suffixes: PATH itself, built under a temporary sibling name). Folders that do not exist
    yet are fine when the nearest existing one is a writable folder. The test is a probe file
    created and removed there: a read-only mount refuses it even for root, whom permission
    bits do not stop. `option` names the flag in messages ("--output-prefix").
    """
    absolute = os.path.abspath(path)
    targets = [absolute + s for s in file_suffixes] if file_suffixes else []
    for target in targets:
        if os.path.isdir(target):
            raise OutputError(f"{option} {path}: {target} is a folder, where a file would be "
                              f"written; choose another {option}")
    if not file_suffixes and os.path.exists(absolute) and not os.path.isdir(absolute):
        raise OutputError(f"{option} {path}: {absolute} is a file, where the dataset folder "
                          f"would be written; choose another {option} or remove the file")
    existing = os.path.dirname(absolute)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise OutputError(f"{option} {path}: {existing} is a file, not a folder, so nothing can "
                          f"be written under it; choose an {option} whose parents are folders")
    try:
        handle, probe = tempfile.mkstemp(prefix=".lce-data-write-test-", dir=existing)
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        why = ("it is on a read-only file system" if error.errno == errno.EROFS
               else f"{error.strerror or error}")
        raise OutputError(f"{option} {path}: cannot create files in {existing}: {why}; "
                          f"choose a writable location") from None


class EmptyOutputError(OutputError):
    """A run that would write a dataset without documents (refused unless --allow-empty)."""


def empty_output_error(what: str, files: Sequence[str], why: str) -> EmptyOutputError:
    """The error of a run whose inputs `files` leave no `what` ("document") to write."""
    named = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    return EmptyOutputError(f"no {what} to write from {named}: {why}, or pass --allow-empty to "
                            f"write an empty dataset")


def all_skipped_reason(skipped: int, first_bad: dict) -> str:
    """Why nothing is left when every record was bad (first_bad: a BadRecord.as_dict())."""
    return (f"all records ({skipped:,}) were bad and skipped (first: {first_bad['path']}:"
            f"{first_bad['line']}: {first_bad['problem']}); fix the input")


NO_RECORDS_REASON = "they hold no record (empty files or blank lines only); check --input"


def write_failure(path: str, error: OSError) -> OutputError:
    """The error of a write to ``path`` the checks could not foresee (a full disk, a file-size
    limit, a quota), naming the path and what to do; the caller removes what it staged."""
    fixes = {errno.ENOSPC: "free space on its disk", errno.EDQUOT: "free space in your quota",
             errno.EFBIG: "raise the file-size limit (ulimit -f) or write elsewhere"}
    fix = fixes.get(error.errno, "check the disk and the folder")
    return OutputError(f"cannot write {path}: {error.strerror or error}; {fix}, then run again "
                       f"(nothing was published)")
