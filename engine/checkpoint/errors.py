"""What goes wrong with checkpoints, as exceptions whose message names the file and the fix."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be saved, found or loaded as asked."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose files are not those that were saved (a checksum, a size or a file
    differs), that is incomplete, or that holds non-finite values: a run resuming skips it for
    an older one; every other reader refuses it."""
