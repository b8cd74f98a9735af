"""Where a search's records go: the ``write``/``find`` contract and its in-memory implementation.

Every sensitivity point, candidate and re-ranking of :mod:`common.search.searcher` is written through a
:class:`Recorder` the moment it is evaluated and looked up there before it is evaluated again, which
is what makes a search resumable. :class:`common.run.logs.RunLog` is the durable one (a run log on disk);
:class:`MemoryRecorder` keeps the records in a list (tests, benchmarks, one-off searches).
"""

from __future__ import annotations

from typing import Protocol


class Recorder(Protocol):
    def write(self, kind: str, text: str = "", **payload) -> dict: ...
    def find(self, kind: str, **match) -> dict | None: ...


class MemoryRecorder:
    """In-memory stand-in for :class:`common.run.logs.RunLog` (same ``write``/``find`` contract)."""

    def __init__(self):
        self.items: list[dict] = []

    def write(self, kind: str, text: str = "", **payload) -> dict:
        rec = {"kind": kind, **payload}
        self.items.append(rec)
        return rec

    def find(self, kind: str, **match) -> dict | None:
        for rec in reversed(self.items):
            if rec["kind"] == kind and all(rec.get(k) == v for k, v in match.items()):
                return rec
        return None
