"""Run logs: one human-readable, append-only text file per run: its format, reader, writer and record selectors.

A run writes ``<log_dir>/<model>/<run_id>.log``. Every record is one line::

    2025-01-31T12:00:00.123Z CANDIDATE      random 3.00x #12 val=91.20% @@ {"kind":"candidate",...}

i.e. ``<ISO-8601 UTC time> <KIND padded> <short human text> @@ <compact JSON record>``. The JSON
object after the first ``" @@ "`` is the whole record: the payload plus ``kind``, ``run_id``,
``t`` (unix time, seconds) and ``seq`` (0-based record index within the run). The text before it is
for people only and is never parsed. Lines without ``" @@ "`` are comments (the writer puts one
header comment at the top of a new file), except a line that starts like a record (an ISO date),
which is a record cut off before its payload and is reported as corrupt.

The JSON is standard (RFC 8259): non-finite floats are written as the strings ``"nan"``,
``"inf"`` and ``"-inf"`` and decoded back to floats by every reader here (the value codec of
:mod:`common.run.jsonvalues`: :func:`encode_value`, :func:`decode_value`). For that to be lossless, those
three exact strings are refused as payload values.

Records are written, flushed and fsynced the moment they are produced, so an interrupted run loses
nothing it already logged, and a run restarted with the same ``run_id`` appends to the same file
and can skip finished work with :meth:`RunLog.find`.

This module is the only implementation of the format: :func:`parse_log` reads it, :class:`RunLog`
writes it, and :func:`config_record`, :func:`plan_records`, :func:`final_records` select records of a
run; :func:`common.run.documents.jsonify` turns logs into one JSON document per run (``jsonify_logs.py``
is its CLI), and ``common.analysis`` reads those documents.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from common.run import lock
from common.run.jsonvalues import decode_value, dumps, encode_value, values_equal
from common.run.logcheck import LogError

__all__ = [
    "KIND_KEYS",
    "LogError",
    "RunLog",
    "decode_value",
    "encode_value",
    "final_records",
    "pack_hits",
    "parse_log",
    "unpack_hits",
]

_LOG = logging.getLogger(__name__)

SEPARATOR = " @@ "
"""Splits a record line into its human part and its JSON record."""

RESERVED_KEYS = ("kind", "run_id", "t", "seq")
"""Keys the writer sets on every record; payloads may not set them (``run_id`` only to itself)."""

KIND_KEYS: dict[str, tuple[str, ...]] = {
    "config": ("model", "dataset", "metric", "methods", "seed"),
    "baseline": ("val_top1", "test_top1", "params", "macs"),
    "layers": ("layers",),
    "sensitivity": ("layer", "level", "score"),
    "candidate": ("method", "target", "index", "score", "macs_factor", "params_factor"),
    "rescore": ("method", "target", "index", "score", "calib_images"),
    "plan": ("method", "target", "metric", "plan"),
    "finetune_epoch": ("method", "target", "epoch", "val_top1"),
    "final": ("method", "target", "decomposition", "test_top1_bn", "macs_factor", "params_factor"),
    "timing": ("stage", "seconds"),
    "end": ("status",),
}
"""Payload keys each known kind must carry (checked when writing; readers are lenient).

Other kinds may be written freely; any extra payload key is kept as is. Accuracies are fractions
in [0, 1]; factors are dense / compressed (so 3.0 means three times fewer MACs or parameters).
"""

_KIND_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")
_RECORD_START_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T")
_KIND_WIDTH = max(len(k) for k in KIND_KEYS)
_HEADER_LINE = (
    "# run log model={model} run_id={run_id} | record lines: <UTC time> <KIND> <text>, then '@@' and the JSON record\n"
)
"""The first line of a new log; :func:`header_model` reads the model back from it (hits logs have no config)."""
_HEADER = re.compile("^" + re.escape(_HEADER_LINE.split("{model}")[0]) + r"(\S+) ")


def check_name(what: str, name: str) -> str:
    """``name`` if it is usable as a file name (run ids, model folders), else ``ValueError`` naming it."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise ValueError(
            f"{what} {name!r} is not usable as a file name: use letters, digits and _.+=- "
            "(not starting with a dot, no '..')"
        )
    return name


def _one_line(text: str) -> str:
    # The human part must stay on one line and must not contain the separator.
    return re.sub(r"@(?=@)", "@ ", " ".join(str(text).split()))


def _auto_text(payload: Mapping[str, Any], limit: int = 6) -> str:
    """Short ``key=value`` text from the scalar fields, for lines written without text."""
    parts = []
    for key, value in payload.items():
        if key == "run_id" or isinstance(value, (dict, list)):
            continue
        if isinstance(value, float):
            value = f"{value:.4g}"
        parts.append(f"{key}={value}")
        if len(parts) == limit:
            break
    return " ".join(parts)


# --------------------------------------------------------------------------- reading


def _parse_line(line: str, ends_file_unterminated: bool) -> tuple[dict | None, str | None]:
    """Return ``(record, None)``, ``(None, reason)`` for a corrupt line, or ``(None, None)``."""
    cut = " (last line, no newline: cut off)" if ends_file_unterminated else ""
    head, sep, body = line.partition(SEPARATOR)
    if not sep:
        if _RECORD_START_RE.match(line):
            return None, f"truncated record: no '{SEPARATOR.strip()}' payload{cut}"
        return None, None  # comment
    try:
        record = json.loads(body)
    except (json.JSONDecodeError, RecursionError) as exc:
        return None, f"bad JSON after '{SEPARATOR.strip()}': {exc}{cut}"
    if not isinstance(record, dict):
        return None, f"JSON after '{SEPARATOR.strip()}' is a {type(record).__name__}, not an object"
    kind = record.get("kind")
    if not isinstance(kind, str) or not kind:
        return None, "record has no 'kind'"
    words = head.split()
    if len(words) >= 2 and words[1].lower() != kind:
        return None, f"kind mismatch: line says {words[1]!r}, record says {kind!r}"
    return decode_value(record), None


def parse_log(path: str | os.PathLike) -> tuple[list[dict], list[LogError]]:
    """Read every record of a run log, skipping (and reporting) corrupt lines.

    Args:
        path: a ``.log`` file written by :class:`RunLog`.

    Returns:
        ``(records, errors)``: the good records in file order (non-finite floats decoded), and one
        :class:`LogError` per corrupt line (bad JSON after ``@@``, no ``kind``, cut-off record,
        binary or non-UTF-8 bytes).

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    records, _, errors = parse_lines(path)
    return records, errors


def config_record(records: Iterable[Mapping[str, Any]], source: str | os.PathLike) -> dict:
    """The first ``config`` record of a run's ``records`` (a resumed run repeats it unchanged).

    Raises:
        ValueError: there is none (naming ``source``, the log they came from).
    """
    for r in records:
        if r.get("kind") == "config":
            return dict(r)
    raise ValueError(f"{source}: no config record; is it a run log of common.run.experiment?")


def plan_records(
    records: Iterable[Mapping[str, Any]], decomposition: str = "ht2"
) -> dict[tuple[str, int, float], dict]:
    """``{(method, seed, target): plan record}`` of one ``decomposition``: the latest record of each.

    Records of logs from before seeds count as seed 0, from before decompositions as HT-2; keys are in
    the order each first appears.
    """
    out: dict[tuple[str, int, float], dict] = {}
    for r in records:
        if r.get("kind") == "plan" and r.get("decomposition", "ht2") == decomposition:
            out[(str(r["method"]), int(r.get("seed", 0)), float(r["target"]))] = dict(r)
    return out


def final_records(
    records: Iterable[Mapping[str, Any]], decomposition: str = "ht2"
) -> dict[tuple[str, int, float], dict]:
    """``{(method, seed, target): final record}`` of one ``decomposition``: the latest record of each (as
    :func:`plan_records`; a resumed stage logs its final again)."""
    out: dict[tuple[str, int, float], dict] = {}
    for r in records:
        if r.get("kind") == "final" and r.get("decomposition", "ht2") == decomposition:
            out[(str(r["method"]), int(r.get("seed", 0)), float(r["target"]))] = dict(r)
    return out


def pack_hits(hits: np.ndarray | Sequence[bool]) -> str:
    """Per-image top-1 hits (bool, shape ``N``, in the split's fixed order) as a record value: the hex of
    their packed bits, ``N / 4`` characters (2,500 for the 10,000 CIFAR-10 test images). ``final`` records
    carry ``test_hits_bn`` / ``test_hits_ft`` so that margins can count the test images as a sample
    (:func:`common.analysis.seed_image_interval`); :func:`unpack_hits` reads them back."""
    return np.packbits(np.asarray(hits, dtype=bool)).tobytes().hex()


def unpack_hits(text: str, n: int) -> np.ndarray:
    """Inverse of :func:`pack_hits`: ``n`` hits (bool).

    Raises:
        ValueError: ``text`` is not hex of ``ceil(n / 8)`` bytes.
    """
    raw = bytes.fromhex(text)
    if len(raw) != (n + 7) // 8:
        raise ValueError(f"unpack_hits: {len(raw)} bytes of hits for {n} images (expected {(n + 7) // 8})")
    return np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=n).astype(bool)


def parse_lines(path: str | os.PathLike) -> tuple[list[dict], list[int], list[LogError]]:
    """:func:`parse_log`, plus the 1-based line number of each record."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"run log not found: {path}")
    data = path.read_bytes()
    text = data.decode("utf-8", errors="replace")  # garbage bytes must not hide the good lines
    lines = text.split("\n")
    unterminated = not text.endswith("\n")
    if not unterminated:
        lines.pop()  # the empty string after the final newline
    records: list[dict] = []
    line_nos: list[int] = []
    errors: list[LogError] = []
    for no, line in enumerate(lines, start=1):
        line = line.rstrip("\r")
        record, reason = _parse_line(line, unterminated and no == len(lines))
        if reason is None and record is None and ("\x00" in line or "\ufffd" in line):
            reason = "binary or non-UTF-8 bytes, not a record or comment"
        if reason is not None:
            errors.append(LogError(str(path), no, reason, line[:200]))
        elif record is not None:
            records.append(record)
            line_nos.append(no)
    return records, line_nos, errors


def header_model(path: Path) -> str | None:
    """The model named by the header line :class:`RunLog` writes first, None without one."""
    with path.open("rb") as fh:
        first = fh.readline(4096).decode("utf-8", errors="replace")
    match = _HEADER.match(first)
    return match.group(1) if match else None


# --------------------------------------------------------------------------- writing


class RunLog:
    """Append-only log of one run: ``<log_dir>/<model>/<run_id>.log``.

    Opening takes the log's lock (:mod:`common.run.lock`): a second process opening the same log gets
    :class:`common.run.lock.LogLockedError` naming the holder's pid. Opening an existing file resumes it: its records are read (see :meth:`records`,
    :meth:`find`), ``seq`` continues after the last one, and a cut-off last line (no trailing
    newline, e.g. after a crash) is first terminated so new records start on a line of their own.

    Args:
        log_dir: root folder of all logs (e.g. ``logs``); created if missing.
        model: model name, used as sub-folder (letters, digits, ``_.+=-``).
        run_id: run identifier, used as file name (same alphabet).

    Attributes:
        path: the log file.
        model, run_id: as given.
        errors: corrupt lines found when the file was reopened.
    """

    def __init__(self, log_dir: str | os.PathLike, model: str, run_id: str) -> None:
        self._open(Path(log_dir) / model / f"{run_id}.log", model, run_id)

    @classmethod
    def at(cls, path: str | os.PathLike, model: str, run_id: str) -> RunLog:
        """A log at ``path`` itself rather than under ``<log_dir>/<model>/`` (e.g. the measurements a
        benchmark keeps beside its CSV), otherwise the same: locked, resumed, records named ``run_id``."""
        self = cls.__new__(cls)
        self._open(Path(path), model, run_id)
        return self

    def _open(self, path: Path, model: str, run_id: str) -> None:
        # the names are checked before the path built from them is touched
        self.model, self.run_id = check_name("model", model), check_name("run_id", run_id)
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = lock.acquire(self.path)  # one writer per log (LogLockedError names the holder)
        self._release = weakref.finalize(self, lock.release, self._lock)
        self._records: list[dict] = []
        self.errors: list[LogError] = []
        self._persist = True
        if self.path.exists():
            self._resume()
        else:
            self._append(_HEADER_LINE.format(model=self.model, run_id=self.run_id), new_file=True)
        self._next_seq = self._seq_after_records()

    @classmethod
    def follower(cls, log_dir: str | os.PathLike, model: str, run_id: str, records: list[dict]) -> RunLog:
        """A rank-``r > 0`` copy of the log rank 0 holds (:mod:`common.dist`): it starts from ``records``
        (rank 0's, as broadcast) and keeps what is written in memory only; no lock, no file access.

        Every rank writes the same records (sharded results are gathered first), so :meth:`find`
        answers alike on every rank while only rank 0's log reaches the disk.
        """
        self = cls.__new__(cls)
        self.model, self.run_id = check_name("model", model), check_name("run_id", run_id)
        self.path = Path(log_dir) / model / f"{run_id}.log"
        self._release = lambda: None
        self._records, self.errors, self._persist = [copy.deepcopy(r) for r in records], [], False
        self._next_seq = self._seq_after_records()
        return self

    def _seq_after_records(self) -> int:
        """The ``seq`` that follows the records held (after the last numbered one)."""
        seqs = [r["seq"] for r in self._records if isinstance(r.get("seq"), int)]
        return max(seqs, default=len(self._records) - 1) + 1

    def close(self) -> None:
        """Release the log's lock (also done when the object is collected or the process ends)."""
        self._release()

    def _resume(self) -> None:
        with open(self.path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            last = b"\n"
            if size:
                fh.seek(-1, os.SEEK_END)
                last = fh.read(1)
        self._records, self.errors = parse_log(self.path)
        for err in self.errors:
            _LOG.warning("%s", err)
        if last != b"\n":
            self._append("\n")

    def _append(self, line: str, new_file: bool = False) -> None:
        if not self._persist:
            return
        # One write per record, then fsync: a crash can only cut the line being written.
        with open(self.path, "a", encoding="utf-8", newline="\n") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        if new_file and hasattr(os, "O_DIRECTORY"):
            fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)  # make the new directory entry durable too
            finally:
                os.close(fd)

    def write(self, kind: str, text: str = "", **payload: Any) -> dict:
        """Append one record and make it durable before returning.

        Args:
            kind: record kind (lower-case identifier, e.g. ``"candidate"``); known kinds must carry
                the keys in :data:`KIND_KEYS`.
            text: short human summary for the line; defaults to a few ``key=value`` pairs.
            **payload: the record's data (JSON-serializable after :func:`encode_value`).

        Returns:
            The record as any reader will see it (``kind``, ``run_id``, ``t``, ``seq`` + payload).

        Raises:
            ValueError: bad kind, missing required key, reserved key or string.
            TypeError: a value that cannot be logged.
        """
        if not isinstance(kind, str) or not _KIND_RE.match(kind):
            raise ValueError(f"{self.path}: record kind {kind!r} must match {_KIND_RE.pattern}")
        for key in RESERVED_KEYS:
            if key in payload and not (key == "run_id" and payload[key] == self.run_id):
                raise ValueError(
                    f"{self.path}: payload key {key!r}={payload[key]!r} of a {kind!r} record is "
                    "reserved (set by the log)"
                )
        missing = [k for k in KIND_KEYS.get(kind, ()) if k not in payload]
        if missing:
            raise ValueError(f"{self.path}: {kind!r} record lacks required key(s) {missing}")
        body = encode_value(payload, kind)
        now = time.time()
        record = {"kind": kind, "run_id": self.run_id, "t": now, "seq": self._next_seq, **body}
        stamp = datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds")
        human = _one_line(text) if text else _one_line(_auto_text(body))
        line = f"{stamp.replace('+00:00', 'Z')} {kind.upper():<{_KIND_WIDTH}} {human}"
        self._append(f"{line.rstrip()}{SEPARATOR}{dumps(record)}\n")
        self._next_seq += 1
        stored = decode_value(record)
        self._records.append(stored)
        return copy.deepcopy(stored)

    def comment(self, text: str) -> None:
        """Append a comment line (``# text``), ignored by readers."""
        self._append(f"# {_one_line(text)}\n")

    def records(self, kind: str | None = None) -> list[dict]:
        """All records of this run (those found on reopening plus those written since).

        Args:
            kind: only records of this kind when given.

        Returns:
            Copies of the records, in write order.
        """
        return [copy.deepcopy(r) for r in self._records if kind is None or r["kind"] == kind]

    def find(self, kind: str, **match: Any) -> dict | None:
        """The last record of ``kind`` whose payload has all of ``match``'s key/values.

        Values are compared after the same conversion as :meth:`write` (tuples equal lists, numpy
        scalars equal Python scalars, NaN equals NaN). Used to skip finished work on resume.

        Returns:
            A copy of the record, or ``None``.
        """
        want = decode_value(encode_value(match, f"find({kind})"))
        for record in reversed(self._records):
            if record["kind"] != kind:
                continue
            if all(k in record and values_equal(record[k], v) for k, v in want.items()):
                return copy.deepcopy(record)
        return None

    def __repr__(self) -> str:
        return f"RunLog({str(self.path)!r}, records={len(self._records)})"
