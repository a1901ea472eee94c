"""The one exception type for mistakes a user can make.

The CLI turns a :class:`TumorsegError` into one line on stderr and exit code 2;
any other exception is our bug and keeps its traceback.
"""

from __future__ import annotations


class TumorsegError(Exception):
    """A user-fixable problem: the message names the file, what is wrong and the fix."""

    exit_code: int = 2


class LockedError(TumorsegError):
    """Another pipeline holds the work folder's lock."""

    exit_code = 4
