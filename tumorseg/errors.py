"""The exception type for mistakes a user can make, and every exit code tumorseg uses.

The CLI turns a :class:`TumorsegError` into one line on stderr and its exit code, and so a file
system's refusal a user can fix (:func:`filesystem_refusal`); any other exception is our bug and
keeps its traceback.
"""

from __future__ import annotations

import errno
from enum import IntEnum


class ExitCode(IntEnum):
    """Exit codes of the ``tumorseg`` commands (the pipeline uses all of them)."""

    OK = 0
    STAGE_FAILED = 1
    CONFIG = 2
    NOT_PROMOTED = 3
    LOCKED = 4
    INTERRUPTED = 130


EXIT_CODES: dict[int, str] = {
    ExitCode.OK: "success: promoted, first champion, or nothing new",
    ExitCode.STAGE_FAILED: "a pipeline stage failed (run the same command again to resume)",
    ExitCode.CONFIG: "bad input or configuration (one line says which file and the fix), or the tracking server "
    "cannot be reached",
    ExitCode.NOT_PROMOTED: "the pipeline completed, but the challenger was not promoted",
    ExitCode.LOCKED: "another pipeline is running in the same work folder",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C or SIGTERM)",
}
"""What each exit code means (printed in the README)."""


class TumorsegError(Exception):
    """A user-fixable problem: the message names the file, what is wrong and the fix."""

    exit_code: int = ExitCode.CONFIG


class LockedError(TumorsegError):
    """Another pipeline holds the work folder's lock."""

    exit_code = ExitCode.LOCKED


_FILESYSTEM_FIXES = {
    errno.ENOTDIR: "a file stands where a folder is needed: choose another output folder",
    errno.EEXIST: "a file stands where a folder is needed: choose another output folder",
    errno.EISDIR: "a folder stands where a file is written: choose another path",
    errno.EACCES: "not writable by this user: choose a folder you can write to",
    errno.EPERM: "not writable by this user: choose a folder you can write to",
    errno.EROFS: "a read-only file system: choose a writable folder",
    errno.ENOSPC: "the disk is full: free space or write elsewhere",
    errno.EDQUOT: "the disk quota is used up: free space or write elsewhere",
}


def filesystem_refusal(exc: OSError) -> str | None:
    """One line for a file system's refusal a user can fix, naming the path; ``None`` for any other ``OSError``.

    An output folder that is a file, no permission, a read-only or full disk.
    """
    fix = _FILESYSTEM_FIXES.get(exc.errno or 0)
    if fix is None or not exc.filename:
        return None
    return f"{exc.filename}: {exc.strerror}; {fix}"
