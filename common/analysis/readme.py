"""The generated results block of the README, between :data:`README_BEGIN` and :data:`README_END`.

The block is made from committed results folders (their ``summary.csv`` and ``policy_vs_rivals.csv``), not
from run logs: :data:`README_TABLE` gives the current table and :data:`README_GRID` the folders of the
verdict grid, so ``tests/test_docs.py`` can check that the README shows what the analysis would write now.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from common.analysis.aggregate import SEED_STAT_COLUMNS
from common.analysis.markdown import DISPLAY_FORMATS, markdown_table, seed_display, seed_sentence
from common.analysis.records import METHOD_ORDER, is_missing
from common.files import atomic_write

__all__ = [
    "README_BEGIN",
    "README_END",
    "README_GRID",
    "README_TABLE",
    "current_table",
    "read_results",
    "readme_block",
    "replace_marked_block",
    "update_readme",
    "verdict_grid",
]

README_BEGIN = "<!-- results:begin -->"
README_END = "<!-- results:end -->"
"""Marker lines around the generated results block in the README."""

DEFAULT_METHOD = "guided"
"""The method users get (:data:`common.search.options.DEFAULT_METHOD`; not imported from there, which would
import torch into the analysis)."""

README_TABLE = "gpu"
"""The results folder whose ``summary.csv`` is the README's current table (the GPU protocol)."""

README_GRID: tuple[tuple[str, str], ...] = (
    ("gpu", "GPU, 3 ep."),
    ("cpu-mse-tight-ft", "CPU ±0.5 %, 1 ep."),
    ("cpu-mse-ft", "CPU, 1 ep."),
    ("cpu-mse-tight", "CPU ±0.5 %"),
    ("cpu-mse", "CPU"),
)
"""Results folders the verdict grid reads (``policy_vs_rivals.csv``), with a short label each. For every
model, budget and stage the first folder that has the cell gives it: finetuned rows on a GPU first, then
the CPU protocols, tightest budget band first."""

GRID_RIVALS = ("uniform", "energy", "vbmf", "random", "tpe")
_SYMBOL = {"policy ahead": "↑", "within noise": "≈", "policy behind": "↓"}
_STAGES = (("bn", "BN"), ("ft", "FT"))
_MODEL_NAMES = {"alexnet": "AlexNet", "resnet18": "ResNet18", "vgg16": "VGG16"}


def _model_name(model: str) -> str:
    return _MODEL_NAMES.get(model, model)


def read_results(results: str | os.PathLike, folders: Sequence[str]) -> dict[str, dict[str, pd.DataFrame]]:
    """``{folder: {"summary": summary.csv, "margins": policy_vs_rivals.csv}}`` of the committed
    ``results/<folder>`` (a file a folder lacks is an empty frame).

    Raises:
        FileNotFoundError: a folder is missing, naming it.
    """
    out = {}
    for name in folders:
        folder = Path(results) / name
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such results folder (named by the README block)")
        out[name] = {
            key: pd.read_csv(folder / file) if (folder / file).is_file() else pd.DataFrame()
            for key, file in (("summary", "summary.csv"), ("margins", "policy_vs_rivals.csv"))
        }
    return out


def _margin_cell(row: Mapping[str, Any], stage: str) -> str:
    """``"↑ +0.49"``: the verdict and margin (pp) of one rival; over seeds and test images (``ⁱ``) where
    that interval is known, else over seeds; ``·`` where there is no interval (one seed); ``–`` where the
    stage has no margin."""
    margin = row.get(f"margin_{stage}")
    if is_missing(margin):
        return "–"
    both = row.get(f"verdict_both_{stage}")
    verdict = both if not is_missing(both) else row.get(f"verdict_{stage}")
    symbol = _SYMBOL.get(verdict, "·")
    return f"{symbol} {margin:+.2f}" + ("ⁱ" if not is_missing(both) else "")


def _claim(cells: Mapping[str, str]) -> str:
    """The claim over every rival of a row from its cells: ahead of all, or which rivals stop it."""
    shown = {r: c for r, c in cells.items() if c != "–"}
    behind = [r for r, c in shown.items() if c.startswith("↓")]
    level = [r for r, c in shown.items() if c.startswith("≈")]
    unknown = [r for r, c in shown.items() if c.startswith("·")]
    if behind:
        return "**behind** " + ", ".join(behind)
    if level:
        return "≈ " + ", ".join(level)
    if unknown:
        return "no interval: " + ", ".join(sorted(unknown))
    return f"ahead of all {len(shown)}" if shown else "–"


def verdict_grid(tables: Mapping[str, Mapping[str, pd.DataFrame]], method: str = "policy") -> pd.DataFrame:
    """One row per model × budget × stage: ``method``'s verdict against each rival, from the first folder
    of :data:`README_GRID` (in ``tables``' order) that has that cell.

    Returns:
        Columns ``model``, ``target``, ``stage``, ``source``, one per rival of :data:`GRID_RIVALS`
        (``"↑ +0.49"`` cells, :func:`_margin_cell`) and ``claim``.
    """
    rows, seen = [], set()
    for folder, frames in tables.items():
        margins = frames["margins"]
        if margins.empty:
            continue
        margins = margins[margins["policy"] == method]
        for (model, target), group in margins.groupby(["model", "target"], sort=True):
            by_rival = {r["rival"]: r for r in group.to_dict("records")}
            for stage, label in _STAGES:
                cells = {r: _margin_cell(by_rival[r], stage) if r in by_rival else "–" for r in GRID_RIVALS}
                if all(c == "–" for c in cells.values()) or (model, target, stage) in seen:
                    continue
                seen.add((model, target, stage))
                rows.append({"model": model, "target": target, "stage": label, "source": folder, **cells})
                rows[-1]["claim"] = _claim(cells)
    grid = pd.DataFrame(rows, columns=["model", "target", "stage", "source", *GRID_RIVALS, "claim"])
    return grid.sort_values(["model", "target", "stage"], kind="stable").reset_index(drop=True)


def current_table(summary_csv: pd.DataFrame) -> pd.DataFrame:
    """The current table (one folder's ``summary.csv``): model, budget, method, MACs and params factors,
    test top-1 after BN and after finetuning and Δ vs dense as mean ± std text cells, in table order."""
    df = summary_csv[summary_csv["decomposition"].fillna("ht2") == "ht2"]
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    df = df.assign(_order=df["method"].map(lambda m: order.get(m, len(order))))
    return seed_display(df.sort_values(["model", "target", "_order"], kind="stable").drop(columns="_order"))


def _best_methods(table: pd.DataFrame) -> list[str]:
    """Per model and budget of the current table, the method with the best mean test top-1 after
    finetuning (after BN where nothing was finetuned), as ``"`tpe` on AlexNet 3× (84.89 %)"``."""
    out = []
    for (model, target), group in table.groupby(["model", "target"], sort=True):
        col = "test_top1_ft_mean" if group["test_top1_ft_mean"].notna().any() else "test_top1_bn_mean"
        best = group.loc[group[col].idxmax()]
        gap = 100.0 * (best[col] - best["baseline_test_top1"])
        out.append(f"`{best['method']}` on {_model_name(model)} {target:g}× ({100.0 * best[col]:.2f} %, {gap:+.2f} pp)")
    return out


def _model_verdicts(grid: pd.DataFrame) -> list[str]:
    """Per model: in how many grid rows the claim holds, and where a rival is ahead."""
    lines = []
    for model, rows in grid.groupby("model", sort=True):
        ahead = rows[rows["claim"].str.startswith("ahead")]
        behind = rows[rows["claim"].str.startswith("**behind**")]
        where = "; ".join(
            f"{r.target:g}× {r.stage}, {r.source}: {r.claim.removeprefix('**behind** ')}" for r in behind.itertuples()
        )
        lines.append(
            f"- **{_model_name(model)}**: ahead of every rival in {len(ahead)} of {len(rows)} cells"
            + (f"; behind a rival in {len(behind)} ({where})" if len(behind) else "; behind none")
            + "."
        )
    return lines


_GRID_HEADERS = {
    "model": "Model",
    "target": "Budget",
    "stage": "Stage",
    "source": "Source",
    "uniform": "uniform",
    "energy": "energy",
    "vbmf": "VBMF",
    "random": "random",
    "tpe": "TPE",
    "claim": "Claim",
}
_TABLE_HEADERS = {
    "model": "Model",
    "target": "Budget",
    "method": "Method",
    "macs_factor": "MACs ×",
    "params_factor": "Params ×",
    "test_top1_bn": "Test BN (%)",
    "test_top1_ft": "Test FT (%)",
    "delta_pp": "Δ vs dense (pp)",
}


def _budget(target: float) -> str:
    return f"{target:g}×"


def _grid_section(grid: pd.DataFrame, title: str, method: str) -> list[str]:
    """(b): one method's verdict grid with its legend (nothing when the folders have no row of it)."""
    if grid.empty:
        return []
    labels = dict(README_GRID)
    shown = grid.assign(
        model=grid["model"].map(_model_name), target=grid["target"].map(_budget), source=grid["source"].map(labels)
    )
    return [
        f"**{title}** `{method}` − rival in pp of test top-1, paired over seeds: ↑ ahead / ≈ within "
        "noise / ↓ behind by the 95 % interval over seeds, or over seeds and test images where the per-image "
        "hits are known (ⁱ). Each row comes from the first of these folders that has it: "
        + ", ".join(f"[{f}](results/{f}/summary.md) ({labels[f]})" for f, _ in README_GRID)
        + ".",
        "",
        markdown_table(shown, _GRID_HEADERS, right=GRID_RIVALS),
    ]


def _table_section(summary_csv: pd.DataFrame) -> list[str]:
    """(a): the current table."""
    shown = current_table(summary_csv)
    seeds = seed_sentence(shown)
    link = f"[results/{README_TABLE}](results/{README_TABLE}/summary.md)"
    return [
        f"**The current table** ({link}: {seeds[0].lower()}{seeds[1:]} BN: after BN recalibration; FT: after "
        "finetuning):",
        "",
        markdown_table(
            shown.assign(model=shown["model"].map(_model_name)),
            _TABLE_HEADERS,
            {**DISPLAY_FORMATS, "target": _budget},
            right=SEED_STAT_COLUMNS,
        ),
    ]


def readme_block(
    results: str | os.PathLike = "results", command: str = "python analyze_results.py --readme README.md"
) -> str:
    """The generated README results block (without the marker lines), from committed results folders.

    (c) *Which rank method should I use?*: the best method per model in the current table and the
    policy's record per model in the verdict grid; (b) the verdict grid (:func:`verdict_grid` over
    :data:`README_GRID`); (a) the current table (:data:`README_TABLE`'s ``summary.csv``). Every number
    is read from the folders' CSVs, which ``analyze_results.py`` wrote; nothing is dated, so the block
    changes only when the results do.

    Raises:
        FileNotFoundError: a named results folder is missing.
    """
    tables = read_results(results, list(dict.fromkeys([README_TABLE, *(f for f, _ in README_GRID)])))
    grid = verdict_grid({f: tables[f] for f, _ in README_GRID})
    default = verdict_grid({f: tables[f] for f, _ in README_GRID}, DEFAULT_METHOD)
    table = tables[README_TABLE]["summary"]
    lines = [
        f"*Generated by `{command}` from the committed results folders named below; do not edit by hand.*",
        "",
        "**Which rank method should I use?** No method is best everywhere. After finetuning, the best mean "
        f"in the current table ([results/{README_TABLE}](results/{README_TABLE}/summary.md)) is "
        + "; ".join(_best_methods(table))
        + f". On your own model, `python -m common.run --model ARCH --checkpoint WEIGHTS.pt --dataset "
        f"imagefolder --data-root DIR` runs the default, `{DEFAULT_METHOD}` "
        "([Compress your own model](#compress-your-own-model)).",
    ]
    if not default.empty:
        stages = " and ".join(sorted(set(default["stage"])))
        lines += [
            f"The default, `{DEFAULT_METHOD}` (the policy seeded with the rule plans, then refined), measured "
            f"so far at stage {stages}, against the five rivals:",
            "",
            *_model_verdicts(default),
        ]
    lines += [
        "",
        "The sensitivity-guided `policy` (the research question: sensitivities alone) against the five rivals:",
        "",
        *_model_verdicts(grid),
        "",
        *_grid_section(default, f"The default, `{DEFAULT_METHOD}`:", DEFAULT_METHOD),
        *_grid_section(grid, "Does the policy win?", "policy"),
        *_table_section(table),
    ]
    return "\n".join(lines)


def _marker_lines(text: str, source: str, begin: str, end: str) -> tuple[list[str], int, int]:
    """The text's lines and the indices of its single begin and end marker lines."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.strip() == begin]
    ends = [i for i, line in enumerate(lines) if line.strip() == end]
    if len(starts) != 1 or len(ends) != 1 or starts[0] > ends[0]:
        raise ValueError(
            f"{source}: needs exactly one line {begin!r} followed by one line {end!r} around the "
            f"generated results (found {len(starts)} and {len(ends)})"
        )
    return lines, starts[0], ends[0]


def replace_marked_block(
    text: str,
    block: str,
    source: str = "text",
    begin: str = README_BEGIN,
    end: str = README_END,
) -> str:
    """``text`` with everything between its marker lines replaced by ``block``.

    The marker lines themselves are kept, so the result can be regenerated any number of times.

    Raises:
        ValueError: the markers are missing, repeated or out of order (naming ``source`` and the
            markers), or ``block`` contains a marker.
    """
    if begin in block or end in block:
        raise ValueError(f"the generated block must not contain {begin!r} or {end!r}")
    lines, b, e = _marker_lines(text, source, begin, end)
    body = block if block.endswith("\n") or not block else block + "\n"
    if not lines[b].endswith("\n"):
        lines[b] += "\n"
    return "".join(lines[: b + 1]) + body + "".join(lines[e:])


def update_readme(path: str | os.PathLike, block: str) -> bool:
    """Put ``block`` between the marker lines of the file ``path``.

    The file is only written when its text changes (atomically), and never when the markers are
    wrong.

    Returns:
        Whether the file changed.

    Raises:
        ValueError: see :func:`replace_marked_block`; the file is left untouched.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    new = replace_marked_block(text, block, source=str(path))
    if new == text:
        return False
    atomic_write(path, lambda fh: fh.write(new.encode("utf-8")))
    return True
