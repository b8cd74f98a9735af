"""Atomic file writes and resumable CSV tables: the toolkit's one implementation of each.

Readers of a file written by :func:`atomic_write` see either its previous content or the whole new
content, never a partial file: the data goes to a temporary file in the same folder (same file
system, so the rename is atomic), is flushed and fsynced, and only then replaces ``path``. On any
failure, an interrupt included, the temporary file is removed and ``path`` is left as it was.

Used by :func:`common.run.documents.jsonify` (run documents) and :func:`common.data.memory.atomic_torch_save`
(decoded-dataset cache, baselines).

A resumable CSV is a table a long measurement appends to row by row, so that a killed run loses at most
the row being written and a re-run reads the rows present and measures only the others (the studies
and benchmarks: ``studies/additivity``, ``studies/matched_macs``, ``studies/train_step``,
``benchmarks/latency.py``; ``studies/proxy_fidelity`` rewrites its table whole with
:func:`write_csv_rows`). :func:`append_csv_rows` writes the header once, when the file is new, and
flushes and fsyncs every call; :func:`read_csv_rows` and :func:`keyed_csv_rows` read the complete
rows back. Cells are written as the ``csv`` module writes them (``None`` as an empty cell, a float as
its shortest round-trip ``repr``, which is also what ``pandas.DataFrame.to_csv`` writes), numpy floats
as Python floats.

This module imports nothing from the toolkit, so any module may use it without an import cycle.
"""

from __future__ import annotations

import csv
import io
import os
import sys
import tempfile
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "atomic_write",
    "append_csv_rows",
    "csv_header",
    "drop_torn_line",
    "keyed_csv_rows",
    "read_csv_rows",
    "write_csv_rows",
]

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


# --- resumable CSV tables ---------------------------------------------------------------------------- #


def _complete(raw: bytes) -> bytes:
    """``raw`` up to its last newline: the lines a write killed midway left whole."""
    return raw if not raw or raw.endswith(b"\n") else raw[: raw.rfind(b"\n") + 1]


def drop_torn_line(path: str | os.PathLike) -> bool:
    """Cut an incomplete last line (a write killed midway) off ``path``; True when there was one.

    A missing file, or one that ends with a newline, is left as it is.
    """
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "r+b") as fh:
        end = fh.seek(0, os.SEEK_END)
        if end == 0:
            return False
        fh.seek(end - 1)
        if fh.read(1) == b"\n":
            return False
        fh.seek(0)
        fh.truncate(len(_complete(fh.read())))
        fh.flush()
        os.fsync(fh.fileno())
    return True


def _lines(path: Path) -> str:
    """The complete lines of ``path`` as text ('' for a missing file); an incomplete last line is left out."""
    return _complete(path.read_bytes()).decode() if path.is_file() else ""


def csv_header(path: str | os.PathLike) -> list[str]:
    """The column names of the CSV at ``path``; ``[]`` for a missing or empty file (or a torn header)."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, "rb") as fh:
        line = fh.readline()
    return next(csv.reader([line.decode()]), []) if line.endswith(b"\n") else []


def read_csv_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    """The complete rows of the CSV at ``path`` as ``{column: text}``, in file order; ``[]`` for a missing
    file. An incomplete last line (a write killed midway) is not a row; the file is not changed."""
    return list(csv.DictReader(io.StringIO(_lines(Path(path)), newline="")))


def keyed_csv_rows(
    path: str | os.PathLike, key: Callable[[dict[str, str]], Hashable]
) -> dict[Hashable, dict[str, str]]:
    """:func:`read_csv_rows` as ``{key(row): row}`` (the last row of a key wins): what a resumed run finds done.

    A row ``key`` cannot read (``KeyError``, ``TypeError``, ``ValueError``) is skipped with a warning on
    stderr naming the file and line: it is measured again.
    """
    done = {}
    for i, row in enumerate(read_csv_rows(path), start=2):
        try:
            done[key(row)] = row
        except (KeyError, TypeError, ValueError) as err:
            print(f"warning: {path}:{i}: unreadable row skipped ({err})", file=sys.stderr)
    return done


def _cell(value: Any) -> Any:
    """A value as :mod:`csv` writes it, but a numpy float as the Python float it holds."""
    return repr(float(value)) if isinstance(value, float) else value


def _csv_text(rows: Iterable[Mapping[str, Any]], fieldnames: Sequence[str], header: bool, lineterminator: str) -> str:
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator=lineterminator)
    if header:
        w.writerow(fieldnames)
    w.writerows([_cell(row[c]) for c in fieldnames] for row in rows)
    return buf.getvalue()


def _check_columns(path: Path, rows: Sequence[Mapping[str, Any]], fieldnames: Sequence[str]) -> None:
    for row in rows:
        if set(row) != set(fieldnames):
            extra, missing = sorted(set(row) - set(fieldnames)), [c for c in fieldnames if c not in row]
            raise ValueError(f"{path}: a row's columns are not the table's (extra {extra}, missing {missing})")


def append_csv_rows(
    path: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    fieldnames: Sequence[str],
    *,
    lineterminator: str = "\r\n",
) -> Path:
    """Append ``rows`` to the CSV at ``path`` in one write, flushed and fsynced: a kill loses at most them.

    The header (``fieldnames``) is written first when the file is missing or empty; an incomplete last
    line left by a killed write is cut off first (:func:`drop_torn_line`), so the rows start on a line
    of their own.

    Args:
        path: the CSV; its folder is created if missing.
        rows: each with exactly the columns ``fieldnames``, written in that order.
        fieldnames: the table's columns.
        lineterminator: ``"\\r\\n"`` as :mod:`csv` writes by default; ``"\\n"`` as ``pandas`` writes.

    Raises:
        ValueError: a row whose columns are not ``fieldnames``, or a file whose header is not, naming
            ``path``; nothing is written then.
    """
    path = Path(path)
    _check_columns(path, rows, fieldnames)
    header = csv_header(path)
    if header and header != list(fieldnames):
        raise ValueError(f"{path}: its columns {header} are not {list(fieldnames)}; use another file")
    path.parent.mkdir(parents=True, exist_ok=True)
    drop_torn_line(path)
    data = _csv_text(rows, fieldnames, not header, lineterminator).encode()
    with open(path, "ab") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return path


def write_csv_rows(
    path: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    fieldnames: Sequence[str],
    *,
    lineterminator: str = "\r\n",
) -> Path:
    """Replace the CSV at ``path`` by the header and ``rows`` atomically (:func:`atomic_write`).

    Cells as :func:`append_csv_rows` writes them.

    Raises:
        ValueError: a row whose columns are not ``fieldnames``, naming ``path``; the file is untouched.
    """
    path = Path(path)
    _check_columns(path, rows, fieldnames)
    data = _csv_text(rows, fieldnames, True, lineterminator).encode()
    return atomic_write(path, lambda fh: fh.write(data))
