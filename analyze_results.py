#!/usr/bin/env python
"""Summarize run documents into ``summary.{csv,md}`` and per-model PNG plots (each with its data as CSV).

Usage: ``python analyze_results.py [--json json/] [--out out/analysis/] [--readme README.md]
[--overwrite-committed]``. The documents come from ``jsonify_logs.py``; the logic lives in
:mod:`common.analysis`. Speed-ups are the runs' own measurements (their ``final`` records; see
:mod:`common.analysis`). ``--readme`` rewrites the block between ``<!-- results:begin -->`` and
``<!-- results:end -->`` in that file from the committed results folders it names
(:func:`common.analysis.readme_block`), after the summary when ``--json`` is given too; alone
(``python analyze_results.py --readme README.md``), it writes only the block. Documents of hits logs (``studies/image_noise/image_noise.py``'s, from
``jsonify_logs.py <results dir>``) are no runs: they give per-image test hits to the margins
(``policy_vs_rivals.csv``'s interval over seeds and test images).

Committed results are never replaced by accident: the default output folder, ``out/analysis/``,
is ignored by git, and writing into a folder that holds files tracked by git (``results/``), or
rewriting a tracked README, is refused unless ``--overwrite-committed`` says so.
Exit status: 0 on success, 2 when no run document was found, an input is malformed, or a tracked
file would be replaced without ``--overwrite-committed``.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from common.analysis import (
    collect_hits,
    is_hits_document,
    load_runs,
    make_plots,
    readme_block,
    replace_marked_block,
    summary_table,
    update_readme,
    write_summary,
)

DEFAULT_OUT = "out/analysis"
"""The default output folder: under ``out/``, which git ignores."""

OVERWRITE_FLAG = "--overwrite-committed"


def tracked_files(path: str | Path) -> list[str]:
    """The files git tracks at or under ``path`` (paths relative to the repository root).

    Empty outside a git repository or without git. Files staged but not yet committed count.

    Raises:
        OSError: git is there but cannot answer (e.g. a repository it refuses to read), so the
            path cannot be checked.
    """
    path = Path(path).resolve()
    anchor = path
    while not anchor.is_dir():
        anchor = anchor.parent
    try:
        done = subprocess.run(
            ["git", "-C", str(anchor), "ls-files", "-z", "--full-name", "--", str(path)],
            capture_output=True,
            timeout=60,
            check=False,
        )
    except FileNotFoundError:  # no git: nothing can be tracked
        return []
    except subprocess.TimeoutExpired as exc:
        raise OSError(f"cannot tell whether {path} is tracked by git: {exc}") from exc
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip()
        if "not a git repository" in message:
            return []
        raise OSError(f"cannot tell whether {path} is tracked by git: {message}")
    return [f for f in done.stdout.decode(errors="replace").split("\0") if f]


def check_not_committed(out_dir: str, readme: str | None) -> None:
    """Refuse to replace files tracked by git (without ``--overwrite-committed``).

    Raises:
        ValueError: ``out_dir`` holds tracked files, or ``readme`` is tracked (names them and the flag).
    """
    tracked = tracked_files(out_dir)
    if tracked:
        shown = ", ".join(tracked[:3]) + (", …" if len(tracked) > 3 else "")
        raise ValueError(
            f"{out_dir} holds {len(tracked)} file(s) tracked by git ({shown}): committed results are "
            f"replaced only with {OVERWRITE_FLAG} (default output: {DEFAULT_OUT}/, ignored by git)"
        )
    if readme and tracked_files(readme):
        raise ValueError(f"{readme} is tracked by git: its results block is rewritten only with {OVERWRITE_FLAG}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--json", help="folder of run documents (default: json/; with --readme alone, no summary is made)"
    )
    parser.add_argument(
        "--results", default="results", help="the results folders the --readme block reads (default: results/)"
    )
    parser.add_argument(
        "--out",
        default=DEFAULT_OUT,
        help=f"output folder (default: {DEFAULT_OUT}/, ignored by git)",
    )
    parser.add_argument(
        "--readme",
        metavar="PATH",
        help="also rewrite the results block between the marker lines of this file",
    )
    parser.add_argument(
        OVERWRITE_FLAG,
        action="store_true",
        help="allow replacing files tracked by git: an --out folder of committed results (results/), "
        "a tracked --readme",
    )
    return parser


def _readme_only(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``--readme`` without ``--json``: rewrite only the README block from the committed results folders."""
    try:
        if not args.overwrite_committed and tracked_files(args.readme):
            raise ValueError(
                f"{args.readme} is tracked by git: its results block is rewritten only with {OVERWRITE_FLAG}"
            )
        changed = update_readme(args.readme, readme_block(args.results))
    except (OSError, ValueError) as exc:
        return _fail(exc)
    print(args.readme if changed else f"{args.readme}: unchanged")
    return 0


def _fail(message: object) -> int:
    print(f"analyze_results: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.json is None and args.readme:
        return _readme_only(args, argv)
    args.json = args.json or "json"
    try:  # everything that can refuse does so before the slow part and before writing anything
        if not args.overwrite_committed:
            check_not_committed(args.out, args.readme)
        if args.readme:
            replace_marked_block(Path(args.readme).read_text(encoding="utf-8"), "", args.readme)
        documents = load_runs(args.json)
        runs = [d for d in documents if not is_hits_document(d)]
        if not runs:
            raise ValueError(f"no run documents (*.json) in {args.json}; run jsonify_logs.py first")
        df = summary_table(runs)  # ValueError e.g. for a final record without a metric
        hits = collect_hits(documents)
    except (OSError, ValueError) as exc:
        return _fail(exc)
    plots = make_plots(runs, args.out)
    command = " ".join(["python analyze_results.py", *map(shlex.quote, argv)])
    try:
        summary = write_summary(df, args.out, plots=plots, command=command, n_runs=len(runs), runs=runs, hits=hits)
    except ValueError as exc:  # hits that are not their finals' (named), found before the summary is written
        return _fail(exc)
    written = [*summary, *(path for png in plots for path in (png, png.with_suffix(".csv")))]
    if args.readme:
        try:
            if update_readme(args.readme, readme_block(args.results)):
                written.append(args.readme)
        except (OSError, ValueError) as exc:
            return _fail(exc)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
