"""One writer per run log: an exclusive ``fcntl.flock`` on ``<log>.lock`` next to the log.

:class:`common.run.logs.RunLog` takes the lock when it opens a log for writing and holds it until
:meth:`~common.run.logs.RunLog.close` (or until the process ends: the operating system releases a flock
when its holder exits or crashes, so a stale lock file never blocks anyone). The holder writes its
pid into the lock file, and a second process is refused with :class:`LogLockedError` naming the log
and that pid. Within one process the lock is shared (counted), so resuming a run in the same process
(a notebook re-running a cell, a test) works while an older :class:`RunLog` object is still alive.
The lock file is left in place: removing it could let two processes lock two different files.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

__all__ = ["LogLockedError", "acquire", "lock_path", "release"]

_HELD: dict[str, list[int]] = {}
"""``{lock file (real path): [fd, holders in this process]}``."""


class LogLockedError(RuntimeError):
    """Another process is writing the same run log."""


def lock_path(log_path: str | os.PathLike) -> Path:
    """The lock file of a log: ``<log>.lock``."""
    p = Path(log_path)
    return p.with_name(p.name + ".lock")


def acquire(log_path: str | os.PathLike) -> str:
    """Take the exclusive lock of ``log_path`` (shared within this process); returns the key for
    :func:`release`.

    Raises:
        LogLockedError: another process holds it (the message names the log and the holder's pid).
    """
    path = lock_path(log_path)
    key = os.path.realpath(path)
    if key in _HELD:
        _HELD[key][1] += 1
        return key
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise LogLockedError(
            f"run log {log_path} is being written by another process (pid {holder}; lock {path}). "
            "Two writers would interleave their records: wait for that run to finish (or stop it), "
            "or give this run another run id."
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = [fd, 1]
    return key


def release(key: str) -> None:
    """Give back one hold of :func:`acquire`; the last one unlocks and closes the lock file."""
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] <= 0:
        del _HELD[key]
        fcntl.flock(held[0], fcntl.LOCK_UN)
        os.close(held[0])
