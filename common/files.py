"""Atomic file writes: the one temp-file + ``os.replace`` implementation of the toolkit.

Readers of a file written by :func:`atomic_write` see either its previous content or the whole new
content, never a partial file: the data goes to a temporary file in the same folder (same file
system, so the rename is atomic), is flushed and fsynced, and only then replaces ``path``. On any
failure, an interrupt included, the temporary file is removed and ``path`` is left as it was.

Used by :func:`common.run.documents.jsonify` (run documents) and :func:`common.data.memory.atomic_torch_save`
(decoded-dataset cache, baselines). This module imports nothing from the toolkit, so any module
may use it without an import cycle.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write"]

FILE_MODE = 0o644
"""Permissions of written files (``mkstemp`` creates 0600; caches may be shared between users)."""


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Write a file atomically: ``write(fh)`` fills a temporary binary file that replaces ``path``.

    Args:
        path: the destination; its folder is created if missing.
        write: called once with the open temporary file (binary mode), e.g.
            ``lambda fh: fh.write(data)`` or ``lambda fh: torch.save(obj, fh)``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        Whatever ``write`` raises (also ``KeyboardInterrupt``); the temporary file is removed and
        ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
