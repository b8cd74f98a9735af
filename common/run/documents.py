"""Run documents: one JSON document per run log (:func:`jsonify`; ``jsonify_logs.py`` is its CLI), which
``common.analysis`` reads. The log format itself is :mod:`common.run.logs`.

A run document (:func:`run_document`, :func:`load_document`) is a dict with ``run_id``, ``model``,
``source`` (the log file), ``records`` (every record, in file order) and ``errors``. Each record is
stored once, in ``records``; :func:`records_of` selects one kind. (Documents written before this
layout also carry a ``by_kind`` copy of the records; :func:`load_document` drops it.)

The JSON is standard, non-finite floats written as strings as in the logs (:mod:`common.run.jsonvalues`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from common.files import atomic_write
from common.run.jsonvalues import decode_value, dumps, encode_value
from common.run.logcheck import LogError, run_errors
from common.run.logs import check_name, header_model, parse_lines

__all__ = [
    "document_path",
    "dumps_document",
    "find_logs",
    "jsonify",
    "load_document",
    "records_of",
    "run_document",
]

_LOG = logging.getLogger(__name__)


def find_logs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (recursively, ``*.log``) into a sorted, de-duplicated list.

    Raises:
        FileNotFoundError: a path does not exist, or no log file was found at all.
    """
    found: dict[Path, Path] = {}
    paths = list(paths)
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(p.rglob("*.log")):
                if f.is_file():
                    found.setdefault(f.resolve(), f)
        elif p.is_file():
            found.setdefault(p.resolve(), p)
        else:
            raise FileNotFoundError(f"no such log file or folder: {p}")
    if not found:
        raise FileNotFoundError("no run logs (*.log) found in " + ", ".join(str(p) for p in paths))
    return sorted(found.values(), key=lambda f: f.as_posix())


def run_document(path: str | os.PathLike) -> tuple[dict, list[LogError]]:
    """Build the JSON document of one run log.

    ``run_id`` comes from the records (else the file stem), ``model`` from the ``config`` record
    (else the header line :class:`RunLog` writes, which a benchmark's log beside its CSV has, else the
    parent folder's name). Records that are not the run's (a repeated ``seq``, a second
    ``config`` record and what follows it) are left out and reported, as is a file without records
    (:func:`common.run.logcheck.run_errors`).

    Returns:
        ``(document, errors)`` with document keys ``run_id``, ``model``, ``source``, ``records``
        (file order; select a kind with :func:`records_of`) and ``errors``
        (``"file:line: reason"``).
    """
    path = Path(path)
    records, line_nos, errors = parse_lines(path)
    records, order_errors = run_errors(str(path), records, line_nos)
    errors = sorted(errors + order_errors, key=lambda e: e.line_no)
    run_id = next((r["run_id"] for r in records if isinstance(r.get("run_id"), str)), path.stem)
    configs = [r for r in records if r["kind"] == "config" and isinstance(r.get("model"), str)]
    model = configs[-1]["model"] if configs else (header_model(path) or path.parent.name)
    document = {
        "run_id": run_id,
        "model": model,
        "source": path.as_posix(),
        "records": records,
        "errors": [str(e) for e in errors],
    }
    return document, errors


def dumps_document(document: Mapping[str, Any]) -> str:
    """Serialize a run document: standard JSON, indent 1, key order as built, final newline."""
    return dumps(encode_value(document, "document"), indent=1) + "\n"


def records_of(document: Mapping[str, Any], kind: str) -> list[dict]:
    """The records of one ``kind`` in a run document, in file (write) order.

    The records themselves, not copies: the document holds each record once.
    """
    return [r for r in document.get("records", []) if r.get("kind") == kind]


def load_document(path: str | os.PathLike) -> dict:
    """Load a run document written by :func:`jsonify` (non-finite floats decoded).

    A ``by_kind`` copy of the records, as documents written before it was dropped carry, is not
    kept: read the records with :func:`records_of`.

    Raises:
        ValueError: the file is not JSON or not a run document.
    """
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("records"), list):
        raise ValueError(f"{path}: not a run document (no 'records' list)")
    document.pop("by_kind", None)
    return decode_value(document)


def document_path(document: Mapping[str, Any], out_dir: str | os.PathLike) -> Path:
    """Where :func:`jsonify` writes a document: ``<out_dir>/<model>/<run_id>.json``."""
    model = check_name("model", document["model"])
    run_id = check_name("run_id", document["run_id"])
    return Path(out_dir) / model / f"{run_id}.json"


def _write_if_changed(path: Path, text: str) -> None:
    """Write ``text`` atomically (:func:`common.files.atomic_write`) unless ``path`` holds it."""
    data = text.encode("utf-8")
    if path.is_file() and path.read_bytes() == data:
        return  # already up to date; leave mtime alone
    atomic_write(path, lambda fh: fh.write(data))


def jsonify(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    on_error: Callable[[LogError], None] | None = None,
) -> list[Path]:
    """Convert run logs into one JSON document per run, ``<out_dir>/<model>/<run_id>.json``.

    Writing is atomic (temporary file + ``os.replace``) and deterministic, so re-running on the
    same logs gives byte-identical files. Every good log is converted whatever the others hold: a log
    that cannot give a document (no records, unreadable, a run id or model that is no usable file name,
    e.g. ``../x``; a run another log already gave) is reported through ``on_error`` as ``file:line:
    reason`` and gets none, as is each corrupt line of the others.

    Args:
        paths: log files and/or folders (searched recursively for ``*.log``).
        out_dir: output root.
        on_error: called with each problem; default logs a warning ``file:line: reason``.

    Returns:
        The written document paths, in input order.

    Raises:
        FileNotFoundError: a path is missing or no log file was found.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    report = on_error or (lambda err: _LOG.warning("%s", err))
    documents: dict[Path, tuple[Path, dict]] = {}
    for log in find_logs(paths):
        try:
            document, errors = run_document(log)
        except OSError as exc:
            report(LogError(str(log), 1, f"unreadable: {exc.strerror or exc}; no document written", ""))
            continue
        for err in errors:
            report(err)
        if not document["records"]:
            continue  # reported: no run to write
        try:
            target = document_path(document, out_dir)
        except ValueError as exc:
            report(LogError(str(log), _name_line(document), f"{exc}; no document written", ""))
            continue
        if target in documents:
            first = documents[target][0]
            report(
                LogError(
                    str(log),
                    _name_line(document),
                    f"run {document['run_id']!r} of model {document['model']!r} is also {first}'s, which is "
                    f"written to {target}; this log is left out (give one of them another run id)",
                    "",
                )
            )
            continue
        documents[target] = (log, document)
    for target, (_, document) in documents.items():
        _write_if_changed(target, dumps_document(document))
    return list(documents)


def _name_line(document: Mapping[str, Any]) -> int:
    """The line of a document's log where its run id and model come from: its first record naming that
    run id (the ``config`` record, normally); line 1 when none does (the name is the file's)."""
    records, line_nos, _ = parse_lines(document["source"])
    for record, line in zip(records, line_nos):
        if record.get("run_id") == document["run_id"]:
            return line
    return 1
