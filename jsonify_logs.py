#!/usr/bin/env python
"""Turn run logs (``logs/<model>/<run_id>.log``) into JSON (``json/<model>/<run_id>.json``).

Usage: ``python jsonify_logs.py [paths ...] [--out json/] [--strict]``. Paths are log files or folders
(searched recursively); the default is ``logs/``. Every good log is converted. Corrupt lines, records
that are not the run's (a repeated ``seq``, a second ``config`` and what follows it), and logs that give
no document (empty, binary, unreadable, a run id or model that is no usable file name, a run another log
already gave) are printed to stderr as ``file:line: reason`` and skipped. Exit status: 0 when a document
was written (with ``--strict``: and nothing was reported), 1 otherwise, 2 when no log was found.
The format lives in :mod:`common.run.logs`, the conversion in :mod:`common.run.documents`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from common.run.documents import jsonify
from common.run.logs import LogError


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", default=["logs"], help="log files or folders (default: logs/)")
    parser.add_argument("--out", default="json", help="output folder (default: json/)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any line or log was reported")
    args = parser.parse_args(argv)

    bad: list[LogError] = []

    def report(err: LogError) -> None:
        bad.append(err)
        print(err, file=sys.stderr)

    try:
        written = jsonify(args.paths, args.out, on_error=report)
    except FileNotFoundError as exc:
        print(f"jsonify_logs: error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    print(
        f"{len(written)} run document(s) written to {args.out}, {len(bad)} problem(s) reported and skipped",
        file=sys.stderr,
    )
    return 1 if not written or (args.strict and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
