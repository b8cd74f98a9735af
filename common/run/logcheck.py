"""What makes a run log (or part of one) unusable: :class:`LogError`, and the checks of a whole log's
records that no single line shows (:func:`run_errors`).

A log is written by one process (:mod:`common.run.lock`) for one run, so its ``seq`` numbers are unique
and it holds one ``config`` record. A repeated ``seq`` means two writers (or a log appended to
twice), and a second ``config`` record means a second run written into the same file: these are
reported, ``file:line: reason``, and the offending records are left out of the run's document (the
later of two records with one ``seq``; the second ``config`` and everything after it). A file with
no record at all (empty, binary, or cut off before its ``config``) is no run.

Imports nothing from the toolkit (:mod:`common.run.logs` re-exports :class:`LogError`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["LogError", "run_errors"]


@dataclass(frozen=True)
class LogError:
    """A line of a run log that could not be read as a record.

    Attributes:
        path: the log file.
        line_no: 1-based line number.
        reason: why the line was rejected.
        text: the line (without its newline), cut to 200 characters.
    """

    path: str
    line_no: int
    reason: str
    text: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line_no}: {self.reason}"


def run_errors(path: str, records: Sequence[dict], line_nos: Sequence[int]) -> tuple[list[dict], list[LogError]]:
    """The records that belong to the run, and one :class:`LogError` per record that does not.

    Args:
        path: the log file (for the messages).
        records: its good records, in file order.
        line_nos: the 1-based line of each record.

    Returns:
        ``(kept, errors)``: ``records`` without the later duplicate of a ``seq`` and without a second
        ``config`` record and what follows it; an error naming each such line, and one (line 1) when
        the file holds no record at all.
    """
    if not records:
        return [], [
            LogError(path, 1, "no records: an empty file, not a run log, or a run cut off before its config", "")
        ]
    kept: list[dict] = []
    errors: list[LogError] = []
    seen: dict[object, int] = {}
    first_config: int | None = None
    for record, no in zip(records, line_nos):
        if record.get("kind") == "config":
            if first_config is not None:
                rest = len(records) - len(kept) - len(errors)
                errors.append(
                    LogError(
                        path,
                        no,
                        f"a second config record (the first is on line {first_config}): this and the "
                        f"{rest - 1} record(s) after it are another run's and are left out",
                        "",
                    )
                )
                break
            first_config = no
        seq = record.get("seq")
        if isinstance(seq, int) and seq in seen:
            errors.append(
                LogError(path, no, f"seq {seq} repeats line {seen[seq]}'s: two writers? (this record left out)", "")
            )
            continue
        if isinstance(seq, int):
            seen[seq] = no
        kept.append(record)
    return kept, errors
