#!/usr/bin/env python
"""Summarize run documents into ``results/summary.{csv,md}`` and per-model PNG plots.

Usage: ``python analyze_results.py [--json json/] [--out results/] [--latency [CSV ...]]
[--readme README.md]``. The documents come from ``jsonify_logs.py``; the logic lives in
:mod:`common.analysis`. Speed-ups come from the latency tables (by default whichever of
``<out>/latency_cpu.csv`` and ``<out>/latency_cuda.csv`` exist; ``--latency`` alone or
``--latency none`` uses the run records instead). ``--readme`` rewrites the block between
``<!-- results:begin -->`` and ``<!-- results:end -->`` in that file. Exit status: 0 on success, 2
when no run document was found or an input is malformed.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from common.analysis import (
    join_latency,
    load_latency,
    load_runs,
    make_plots,
    readme_block,
    replace_marked_block,
    summary_table,
    update_readme,
    write_summary,
)

DEFAULT_LATENCY = ("latency_cpu.csv", "latency_cuda.csv")


def latency_paths(option: Sequence[str] | None, out_dir: str) -> list[str]:
    """The latency tables to join: ``--latency`` as given, or the defaults in ``out_dir`` that
    exist; none for ``--latency`` without paths or ``--latency none``."""
    if option is None:
        return [str(p) for name in DEFAULT_LATENCY if (p := Path(out_dir) / name).is_file()]
    if [p.lower() for p in option] == ["none"]:
        return []
    return list(option)


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
        "--latency",
        nargs="*",
        metavar="PATH",
        help="latency CSVs whose speed-ups replace the run records' (default: whichever of "
        "<out>/latency_cpu.csv, <out>/latency_cuda.csv exist; no PATH or 'none': run records)",
    )
    parser.add_argument(
        "--readme",
        metavar="PATH",
        help="also rewrite the results block between the marker lines of this file",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    sources = latency_paths(args.latency, args.out)
    try:
        if args.readme:  # fail before the slow part when the README cannot take the block
            replace_marked_block(Path(args.readme).read_text(encoding="utf-8"), "", args.readme)
        runs = load_runs(args.json)
        latency = load_latency(sources) if sources else None
    except (OSError, ValueError) as exc:
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
    if latency is not None:
        df = join_latency(df, latency)
    plots = make_plots(runs, args.out)
    command = " ".join(["python analyze_results.py", *map(shlex.quote, argv)])
    written = [
        *write_summary(
            df, args.out, plots=plots, command=command, n_runs=len(runs), latency_sources=sources
        ),
        *plots,
    ]
    if args.readme:
        block = readme_block(
            df, runs, command, summary_link=summary_link(args.readme, args.out), latency=latency
        )
        if update_readme(args.readme, block):
            written.append(args.readme)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
