"""Tensor files of a checkpoint written by the saving process itself, never by a forked child.

megatron-core's torch_dist save writes each rank's tensor files from processes it forks for the
duration of the save (FileSystemWriterAsync.write_preloaded_data_multiproc) and collects their
results through a multiprocessing Manager, a further process. A forked writer inherits every
open descriptor of the trainer, the rendezvous port included: if the trainer is killed while
it writes, the writer is left behind holding that port, and the next run on the machine cannot
bind it. The engine saves synchronously anyway, so the writing gains nothing from being in
another process: ``write_in_process()`` makes megatron write the same files, with the same
contents and fsync, from threads of the calling process (file writes release the GIL), and
collect the results in a plain in-process queue. Nothing then outlives the process that saves.
"""
from __future__ import annotations

import inspect
import queue
from concurrent.futures import ThreadPoolExecutor

from megatron.core.dist_checkpointing.strategies import filesystem_async

_Writer = filesystem_async.FileSystemWriterAsync
# The exception a writer thread of this process met in the last save: megatron passes it on
# pickled (its cause, e.g. the OSError of a full disk, lost), save_checkpoint reports it whole.
_last_failure: list[BaseException] = []


def _write_buckets(transform_list, use_msc, rank, write_buckets, results_queue) -> None:
    """What write_preloaded_data_multiproc does, one thread per file instead of one process:
    puts {bucket index: write results} (or the first worker's exception) on ``results_queue``."""
    write = getattr(_Writer.write_preloaded_data, "__wrapped__", _Writer.write_preloaded_data)
    results, pending = queue.Queue(), queue.Queue()
    extra = {"use_msc": True} if use_msc else {}

    def one(index_and_bucket):
        pending.put(index_and_bucket[0])  # write_preloaded_data takes one item off when done
        write(transform_list, *index_and_bucket, results, pending, True, **extra)

    with ThreadPoolExecutor(max(len(write_buckets), 1)) as pool:
        list(pool.map(one, enumerate(write_buckets)))
    collected: dict | Exception = {}
    _last_failure.clear()
    while not results.empty():
        index, outcome = results.get()
        if isinstance(outcome, Exception):
            collected = outcome
            _last_failure[:] = [outcome]
            break
        collected[index] = outcome
    results_queue.put(collected)


def _in_process_queue(mp_mode: str = "spawn"):
    return queue.Queue()


# The megatron-core writer this module stands in for (0.16's signature); another signature
# (a later release) is left alone rather than called with the wrong arguments.
_REPLACED_SIGNATURE = ["transform_list", "use_msc", "rank", "write_buckets",
                       "global_results_queue"]


def write_in_process() -> bool:
    """Make megatron-core's torch_dist save write from the calling process (idempotent). False
    when this megatron-core's writer is not one this module knows (left as it is).

    megatron-core 0.16 forks writer processes (replaced by threads here) and collects their
    results through a multiprocessing Manager; 0.19 writes from threads already but still
    starts a Manager process for the results queue (replaced by an in-process queue)."""
    if writes_in_process():
        return True
    multiproc = getattr(_Writer, "write_preloaded_data_multiproc", None)
    if multiproc is not None:
        if list(inspect.signature(multiproc).parameters) != _REPLACED_SIGNATURE:
            return False
        _Writer.write_preloaded_data_multiproc = staticmethod(_write_buckets)
        filesystem_async._get_write_results_queue = _in_process_queue
        return True
    if (hasattr(_Writer, "write_preloaded_data_multithread")
            and hasattr(filesystem_async, "get_write_results_queue")):
        filesystem_async.get_write_results_queue = _in_process_queue
        # Its threads' exceptions reach the caller as a RuntimeError naming only their type:
        # keep each one (a full disk's OSError names the file) for save_checkpoint to report.
        _Writer.write_preloaded_data = staticmethod(_recording(_Writer.write_preloaded_data))
        return True
    return False


def _recording(write):
    def write_and_record(*args, **kwargs):
        output = write(*args, **kwargs)
        if output is not None and isinstance(output[1], BaseException):
            _last_failure[:] = [output[1]]
        return output
    return write_and_record


def take_write_failure() -> BaseException | None:
    """The exception a writer thread of this process met in the last save (then forgotten)."""
    failure = _last_failure[0] if _last_failure else None
    _last_failure.clear()
    return failure


def writes_in_process() -> bool:
    """Whether write_in_process() is in effect."""
    if hasattr(_Writer, "write_preloaded_data_multiproc"):
        return (_Writer.write_preloaded_data_multiproc is _write_buckets
                and getattr(filesystem_async, "_get_write_results_queue", None)
                is _in_process_queue)
    return getattr(filesystem_async, "get_write_results_queue", None) is _in_process_queue
