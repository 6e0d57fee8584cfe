"""One exception type for problems the user can fix.

The CLI prints `error: <cause> -- <fix>` on one line and exits with code 2; no traceback.
"""

import errno


class NestuneError(Exception):
    def __init__(self, cause: str, fix: str = ""):
        self.cause = cause
        self.fix = fix
        super().__init__(f"{cause} -- {fix}" if fix else cause)


DISK_FIX = ("free some space or give --out a folder on a larger disk, then rerun the same command: finished stages are "
            "kept and it resumes")


def disk_full(error: BaseException) -> NestuneError | None:
    """The one-line error for a full disk, or None for any other error.

    The OS reports it as ENOSPC; safetensors' Rust writer raises its own error type with the OS message inside.
    """
    if getattr(error, "errno", None) != errno.ENOSPC and "No space left on device" not in str(error):
        return None
    where = getattr(error, "filename", None)
    return NestuneError(f"the disk is full (no space left on device){f' writing {where}' if where else ''}", DISK_FIX)
