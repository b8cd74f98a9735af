#!/usr/bin/env python
"""Summarize run documents into ``results/summary.{csv,md}`` and per-model PNG plots.

Usage: ``python analyze_results.py [--json json/] [--out results/]``. The documents come from
``jsonify_logs.py``; the logic lives in :mod:`common.analysis`. Exit status: 0 on success, 2 when
no run document was found.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence

from common.analysis import load_runs, make_plots, summary_table, write_summary


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="json", help="folder of run documents (default: json/)")
    parser.add_argument("--out", default="results", help="output folder (default: results/)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        runs = load_runs(args.json)
    except (FileNotFoundError, ValueError) as exc:
        print(f"analyze_results: error: {exc}", file=sys.stderr)
        return 2
    if not runs:
        print(
            f"analyze_results: error: no run documents (*.json) in {args.json}; "
            "run jsonify_logs.py first",
            file=sys.stderr,
        )
        return 2
    df = summary_table(runs)
    plots = make_plots(runs, args.out)
    command = " ".join(["python analyze_results.py", *map(shlex.quote, argv)])
    written = [*write_summary(df, args.out, plots=plots, command=command, n_runs=len(runs)), *plots]
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
