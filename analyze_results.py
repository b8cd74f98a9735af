#!/usr/bin/env python
"""Summarize run documents into ``results/summary.{csv,md}`` and per-model PNG plots.

Usage: ``python analyze_results.py [--json json/] [--out results/] [--readme README.md]``. The
documents come from ``jsonify_logs.py``; the logic lives in :mod:`common.analysis`. Speed-ups are
the runs' own measurements (their ``final`` records; see :mod:`common.analysis`). ``--readme``
rewrites the block between ``<!-- results:begin -->`` and ``<!-- results:end -->`` in that file.
Exit status: 0 on success, 2 when no run document was found or an input is malformed.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from common.analysis import (
    load_runs,
    make_plots,
    readme_block,
    replace_marked_block,
    summary_table,
    update_readme,
    write_summary,
)


def summary_link(readme: str, out_dir: str) -> str:
    """Link from the README to ``<out>/summary.md``: relative when the summary lies under the
    README's folder, else the path as written (the summary is elsewhere, so say where)."""
    summary = Path(out_dir) / "summary.md"
    try:
        return summary.resolve().relative_to(Path(readme).resolve().parent).as_posix()
    except ValueError:
        return summary.as_posix()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="json", help="folder of run documents (default: json/)")
    parser.add_argument("--out", default="results", help="output folder (default: results/)")
    parser.add_argument(
        "--readme",
        metavar="PATH",
        help="also rewrite the results block between the marker lines of this file",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        if args.readme:  # fail before the slow part when the README cannot take the block
            replace_marked_block(Path(args.readme).read_text(encoding="utf-8"), "", args.readme)
        runs = load_runs(args.json)
    except (OSError, ValueError) as exc:
        print(f"analyze_results: error: {exc}", file=sys.stderr)
        return 2
    if not runs:
        print(
            f"analyze_results: error: no run documents (*.json) in {args.json}; run jsonify_logs.py first",
            file=sys.stderr,
        )
        return 2
    try:
        df = summary_table(runs)
    except ValueError as exc:  # e.g. a final record without a metric, or a percentage accuracy
        print(f"analyze_results: error: {exc}", file=sys.stderr)
        return 2
    plots = make_plots(runs, args.out)
    command = " ".join(["python analyze_results.py", *map(shlex.quote, argv)])
    written = [
        *write_summary(df, args.out, plots=plots, command=command, n_runs=len(runs)),
        *plots,
    ]
    if args.readme:
        block = readme_block(df, runs, command, summary_link=summary_link(args.readme, args.out))
        if update_readme(args.readme, block):
            written.append(args.readme)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
