"""The summary files: ``summary.csv`` (per run and configuration), ``summary_seeds.csv`` (per seed),
``policy_vs_rivals.csv``, ``finetune_recovery.csv`` and ``summary.md`` (provenance, the runs, the table,
the policy's margins, what finetuning recovers, the plots)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from common.analysis.aggregate import SEED_STAT_COLUMNS, aggregate_seeds
from common.analysis.context import RUNS_COLUMNS, runs_table
from common.analysis.hits import HitsKey
from common.analysis.margins import POLICY_METHODS, POLICY_RIVALS, STAGE_NAMES, STAGES, policy_margins, rival_margins
from common.analysis.markdown import (
    DISPLAY_FORMATS,
    MARKDOWN_COLUMNS,
    Format,
    factor,
    markdown_table,
    seed_count_text,
    seed_display,
)
from common.analysis.plots import plot_caption
from common.analysis.records import is_missing
from common.analysis.recovery import finetune_recovery
from common.files import atomic_write

__all__ = ["SPEEDUP_ORIGIN", "write_summary"]

SPEEDUP_ORIGIN = "the runs' `final` records"
"""Where every speed-up comes from, as stated in ``summary.md`` and the README block."""


def utc_now() -> datetime:
    """The current UTC time (one place, so tests can pin the date of every generated header)."""
    return datetime.now(UTC)


def write_summary(
    df: pd.DataFrame,
    out_dir: str | os.PathLike,
    plots: Sequence[str | os.PathLike] = (),
    command: str | None = None,
    n_runs: int | None = None,
    runs: Sequence[Mapping] = (),
    hits: Mapping[HitsKey, np.ndarray] | None = None,
) -> tuple[Path, Path, Path, Path, Path]:
    """Write ``summary.csv`` (per configuration), ``summary_seeds.csv`` (per seed), ``summary.md``,
    ``policy_vs_rivals.csv`` (the policy's paired margin over each rival), ``finetune_recovery.csv``
    (how much of each plan's BN gap to dense finetuning recovers).

    Every file is replaced atomically (a reader never sees half a file).

    Args:
        df: output of :func:`~common.analysis.summary_table`; one row per run and seed.
        out_dir: folder for the files (created if missing).
        plots: plot files to link from the Markdown (paths made relative to ``out_dir``), each
            with its data (``.csv``, same stem) when that exists.
        command: the command that produced the results, stated in the Markdown header.
        n_runs: number of runs analysed, stated in the header when given.
        runs: the run documents, listed in a "Runs" section (dataset, checkpoint, device, date).
        hits: the finals' per-image test hits (:func:`~common.analysis.collect_hits`): the margins over
            each rival then also count the test images as a sample where every paired final has them.

    Returns:
        ``(csv_path, md_path, seeds_csv_path, rivals_csv_path, recovery_csv_path)``: ``summary.csv``
        holds :func:`~common.analysis.aggregate_seeds` of ``df`` (mean / std / ``n_seeds`` columns),
        ``summary_seeds.csv`` every column of ``df``, ``policy_vs_rivals.csv``
        :func:`~common.analysis.rival_margins` of ``df``, ``finetune_recovery.csv``
        :func:`~common.analysis.finetune_recovery` of ``df`` (no rows without finetuning).
    """
    out_dir = Path(out_dir)
    csv_path, md_path = out_dir / "summary.csv", out_dir / "summary.md"
    seeds_path = out_dir / "summary_seeds.csv"
    rivals = rival_margins(df, hits=hits)  # first: hits that are not their finals' stop it before any write
    agg = aggregate_seeds(df)
    _write_text(csv_path, agg.to_csv(index=False))
    _write_text(seeds_path, df.to_csv(index=False))
    rivals_path = out_dir / "policy_vs_rivals.csv"
    _write_text(rivals_path, rivals.to_csv(index=False))
    recovery_path = out_dir / "finetune_recovery.csv"
    recovery = finetune_recovery(df)
    _write_text(recovery_path, recovery.to_csv(index=False))

    lines = _summary_intro(agg, command, n_runs) + _runs_section(runs)
    if df.empty:
        lines += ["No `final` records found.", ""]
    else:
        display = seed_display(agg)
        lines += ["## Results", ""]
        lines.append(markdown_table(display, MARKDOWN_COLUMNS, DISPLAY_FORMATS, right=SEED_STAT_COLUMNS))
        lines += margins_section(policy_margins(df, hits=hits))
        lines += rivals_section(rivals)
        lines += recovery_section(recovery)
    lines += _plots_section(plots, out_dir)
    _write_text(md_path, "\n".join(lines))
    return csv_path, md_path, seeds_path, rivals_path, recovery_path


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def _summary_intro(agg: pd.DataFrame, command: str | None, n_runs: int | None) -> list[str]:
    """Title, provenance and column definitions of ``summary.md``."""
    date = utc_now().strftime("%Y-%m-%d %H:%M UTC")
    runs_text = f" from {n_runs} run(s)" if n_runs is not None else ""
    seeds_text = f" ({seed_count_text(agg)} per configuration)" if not agg.empty else ""
    return [
        "# Compression results",
        "",
        f"Generated by `{command or 'common.analysis.write_summary'}` on {date}{runs_text}; "
        f"speed-ups from {SPEEDUP_ORIGIN}.",
        "",
        "Accuracies are top-1 in %. BN = after BatchNorm recalibration, FT = after finetuning. "
        "Factors (×) are dense / compressed. Δ vs dense = final test accuracy (FT when present, "
        "else BN) minus the run's own dense model's, in percentage points. Speed-ups are measured "
        "forward latency ratios (best CPU setting, and CUDA when measured); – = not measured. "
        "Accuracies and Δ are mean ± sample std (ddof 1) over the Seeds column's seeds"
        f"{seeds_text}; a single seed shows its value; factors, speed-ups and costs are means. "
        "Rows belong to one run each (Dataset, Checkpoint, Run): a configuration that two runs "
        "computed is two rows, and methods are only compared within one run. Within a run, a "
        "configuration logged twice at one seed (a resumed run) counts its latest record. "
        "`summary.csv` holds these means and stds, `summary_seeds.csv` one row per seed.",
        "",
    ]


def _runs_section(runs: Sequence[Mapping]) -> list[str]:
    """The "Runs" table of ``summary.md``: what each run is (none without run documents)."""
    if not runs:
        return []
    headers = dict(
        zip(RUNS_COLUMNS, ["Run", "Model", "Dataset", "Checkpoint", "Checkpoint file", "Device", "Started", "Status"])
    )
    return [
        "## Runs",
        "",
        "Checkpoint: the first 12 characters of the checkpoint's content hash where the run logged "
        "one, else the checkpoint's file name.",
        "",
        markdown_table(pd.DataFrame(runs_table(runs), columns=list(RUNS_COLUMNS)), headers),
    ]


def _relative(path: Path, out_dir: Path) -> str:
    """``path`` relative to ``out_dir`` where it lies under it, else as given."""
    try:
        return path.resolve().relative_to(out_dir.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _plots_section(plots: Sequence[str | os.PathLike], out_dir: Path) -> list[str]:
    """The "Plots" list of ``summary.md``: each plot, its data (CSV) and its caption."""
    if not plots:
        return []
    lines = ["## Plots", ""]
    for plot in map(Path, plots):
        data = plot.with_suffix(".csv")
        data_link = f" ([data]({_relative(data, out_dir)}))" if data.exists() else ""
        lines.append(f"- [{plot.stem}]({_relative(plot, out_dir)}){data_link}: {plot_caption(plot.stem)}")
    lines.append("")
    return lines


# --------------------------------------------------------------------------- policy margins


def _interval_cell(low: float, high: float) -> str | None:
    return None if is_missing(low) else f"[{low:+.2f}, {high:+.2f}]"


_STAGE_TITLES = {"bn": "After BN recalibration (BN)", "ft": "After finetuning (FT)"}


def _stage_margins(margins: pd.DataFrame, stage: str) -> tuple[pd.DataFrame, dict[str, str]]:
    """One stage's table of the margins: the policy run's keys, then the best rival's margin with its
    interval and verdict in one cell, seeds, the mean over every rival, the claim over all of them, the
    MACs comparison and, where per-image hits are known, the interval over seeds and test images."""
    display = margins.copy()
    cols = [margins[f"{f}_{stage}"] for f in ("margin", "ci_low", "ci_high", "verdict")]
    display["margin_cell"] = [_margin_cell(*v) for v in zip(*cols)]
    headers = {"model": "Model", "run_id": "Run", "target": "Target", "policy": "Policy"}
    headers |= {
        f"best_rival_{stage}": "Best rival",
        "margin_cell": "Margin (pp) [95 % CI]",
        f"n_{stage}": "Seeds",
        f"each_rival_{stage}": "vs each rival (pp)",
        f"every_rival_{stage}": "Every rival",
        f"macs_pct_{stage}": "Policy MACs vs best rival",
    }
    if margins[f"ci_low_both_{stage}"].notna().any():
        cols = [margins[f"{f}_{stage}"] for f in ("ci_low_both", "ci_high_both", "verdict_both")]
        display["both_cell"] = [_both_cell(*v) for v in zip(*cols)]
        headers |= {
            "both_cell": "95 % CI over seeds and test images",
            f"every_rival_both_{stage}": "Every rival, seeds and test images",
        }
    return display, headers


def _pct_cell(pct: float) -> str | None:
    """``+2.1 %``: the policy's MACs relative to a rival's (:func:`~common.analysis.macs_pct`)."""
    return None if is_missing(pct) else f"{pct:+.1f} %"


def _verdict_word(verdict: str | None) -> str:
    """A margin verdict's one word in a table cell: ``ahead``, ``behind``, or nothing (within noise)."""
    return {"policy ahead": "ahead", "policy behind": "behind"}.get(verdict or "", "")


def _margin_cell(margin: float, low: float, high: float, verdict: str | None) -> str | None:
    """``+0.34 [+0.13, +0.55] ahead``: a margin, its interval and the verdict's one word."""
    if is_missing(margin):
        return None
    word = _verdict_word(verdict)
    interval = _interval_cell(low, high)
    return " ".join(x for x in (f"{margin:+.2f}", interval, word) if x)


def _bonferroni_cell(low: float, high: float, verdict: str | None, k: int) -> str | None:
    """``[-0.00, +0.45] k = 2``: a joint interval, the family it holds over, the verdict's word."""
    interval = _interval_cell(low, high)
    if interval is None:
        return None
    return " ".join(x for x in (interval, f"k = {k}", _verdict_word(verdict)) if x)


def _both_cell(low: float, high: float, verdict: str | None, floor: float = math.nan) -> str | None:
    """``[-0.07, +0.57] (floor 0.44)``: the interval over seeds and test images, its verdict's word and, when
    given, the smallest margin these test images let any number of seeds find (80 % power)."""
    interval = _interval_cell(low, high)
    if interval is None:
        return None
    floor_text = None if is_missing(floor) else f"(floor {floor:.2f})"
    return " ".join(x for x in (interval, _verdict_word(verdict), floor_text) if x)


def rivals_section(rivals: pd.DataFrame) -> list[str]:
    """The "Against each rival" section of ``summary.md`` (:func:`rival_margins`); empty without rows."""
    if rivals.empty:
        return []
    display = rivals.copy()
    headers = {"model": "Model", "run_id": "Run", "target": "Target", "policy": "Policy", "rival": "Rival"}
    cost = both = ""
    if not rivals["macs_pct"].isna().all():
        headers["macs_pct"] = "Policy MACs vs rival"
        cost = (
            " *Policy MACs vs rival*: how many more MACs the policy's plans keep than the rival's, paired "
            "by seed (+ = the policy spends more of the budget band)."
        )
    for stage, _ in STAGES:
        if (rivals[f"n_{stage}"] == 0).all():
            continue
        cols = [rivals[f"{f}_{stage}"] for f in ("margin", "ci_low", "ci_high", "verdict")]
        display[f"cell_{stage}"] = [_margin_cell(*v) for v in zip(*cols)]
        headers[f"cell_{stage}"] = f"{STAGE_NAMES[stage]}: margin (pp) [95 % CI]"
        cols = [rivals[f"{f}_{stage}"] for f in ("ci_low_bonf", "ci_high_bonf", "verdict_bonf", "k")]
        display[f"bonf_{stage}"] = [_bonferroni_cell(*v) for v in zip(*cols)]
        headers[f"bonf_{stage}"] = f"{STAGE_NAMES[stage]}: joint CI over k rivals"
        if rivals[f"ci_low_both_{stage}"].notna().any():
            cols = [rivals[f"{f}_{stage}"] for f in ("ci_low_both", "ci_high_both", "verdict_both", "floor")]
            display[f"both_{stage}"] = [_both_cell(*v) for v in zip(*cols)]
            headers[f"both_{stage}"] = f"{STAGE_NAMES[stage]}: 95 % CI over seeds and test images"
            both = (
                " *CI over seeds and test images*: where every paired final's per-image test hits are known (logged "
                "by the run, or re-measured by `studies/image_noise/image_noise.py` into the folder's hits log), the same "
                "margin with the test images counted as a sample too (`seed_image_interval`, centred on the "
                "logged margin; – where hits are missing); *floor*: the smallest true margin found with 80 % "
                "power on these test images whatever the number of seeds."
            )
    return [
        "### Against each rival",
        "",
        "The same paired margins against every rival, not only the best one (`policy_vs_rivals.csv`): "
        'the claim is that the policy beats each of them. "Ahead of every rival" needs each 95 % '
        "interval to exclude 0 and no correction (*Every rival* above). Reading one row as a finding "
        "of its own while the cell's other rivals were looked at too needs the *joint* interval: "
        "Bonferroni over the k rivals of that run, target and stage with an interval (each at "
        "1 − 0.05 / k), so that all k hold together with probability ≥ 95 %. Neither corrects for "
        "seeds added after a look at the margins, nor across models and budgets." + cost + both,
        "",
        markdown_table(display, headers, {"target": factor, "macs_pct": _pct_cell}),
        "",
    ]


def margins_section(margins: pd.DataFrame) -> list[str]:
    """The "Does the policy win?" section of ``summary.md``, one table per stage (BN, FT; a stage nobody
    measured is left out); empty without policy and rival."""
    if margins.empty:
        return []
    stages = [stage for stage, _ in STAGES if not margins[f"best_rival_{stage}"].isna().all()]
    both = ""
    if any(margins[f"ci_low_both_{stage}"].notna().any() for stage in stages):
        both = (
            " *CI over seeds and test images*: the same margin with the test images counted as a sample too, where "
            "every paired final's per-image test hits are known (as in *Against each rival* below); *Every rival, "
            "seeds and test images*: the claim read from those intervals, where every rival of the cell has one."
        )
    lines = [
        "## Does the policy win?",
        "",
        "HT-2 policy minus its best rival at the same budget within the same run, in percentage "
        f"points of test accuracy, one row per policy run and one table per stage ({', '.join(POLICY_METHODS)}; "
        "`policy_seeded` is the policy's search with the rule plans among its candidates, `guided` the same "
        f"refined around its best candidate); rivals: {', '.join(POLICY_RIVALS)} (those run). The best rival has "
        "the highest mean accuracy over its seeds. The margin is paired by seed: the mean of the "
        "per-seed differences over the seeds both methods ran, with its 95 % Student-t "
        "confidence interval (none with a single seed) and its verdict: ahead / behind when the interval "
        "excludes 0, else within noise (no word). *vs each rival*: the mean paired margin over every rival. "
        '*Every rival*: the claim itself, "ahead of all k" when the paired 95 % interval against each '
        "rival excludes 0 on the policy's side (an intersection-union test: no correction for k is "
        'needed for "all"), else the rivals that stop it. '
        "*Policy MACs vs best rival*: how many more MACs the policy's plans keep than the best rival's, "
        "paired over the same seeds (+ = the policy spends more of the budget band; "
        "`studies/matched_macs/matched_macs.py` re-picks at equal MACs)." + both,
        "",
    ]
    for stage in stages:
        display, headers = _stage_margins(margins, stage)
        formats: dict[str, Format] = {
            "target": factor,
            f"n_{stage}": lambda n: str(n) if n else "–",
            f"macs_pct_{stage}": _pct_cell,
        }
        table = markdown_table(display, headers, formats, right=["margin_cell", "both_cell"])
        lines += [f"### {_STAGE_TITLES[stage]}", "", table, ""]
    return lines


def recovery_section(recovery: pd.DataFrame) -> list[str]:
    """The "What finetuning recovers" section of ``summary.md`` (:func:`finetune_recovery`); empty
    without finetuned rows."""
    if recovery.empty:
        return []
    display = recovery.copy()
    display["slope_cell"] = [
        f"{m:.2f}" + ("" if is_missing(lo) else f" [{lo:.2f}, {hi:.2f}]")
        for m, lo, hi in zip(recovery["slope"], recovery["slope_low"], recovery["slope_high"])
    ]
    display["tau_cell"] = [
        None if is_missing(t) else f"{t:+.2f} (p = {p:.2g})"
        for t, p in zip(recovery["kendall_tau"], recovery["kendall_p"])
    ]
    headers = {
        "model": "Model",
        "run_id": "Run",
        "target": "Target",
        "n_plans": "Plans",
        "mean_gap_pp": "Mean gap to dense, BN (pp)",
        "mean_gain_pp": "Mean FT gain (pp)",
        "slope_cell": "Gain per pp of gap [95 % CI]",
        "tau_cell": "Kendall τ (gap, gain)",
    }
    if recovery["note"].fillna("").astype(bool).any():
        headers["note"] = "Note"
    return [
        "## What finetuning recovers",
        "",
        "Every finetuned HT-2 plan (method × seed) of a run and target is one point: its gap to the "
        "dense model after BN recalibration and its gain from finetuning (test top-1, pp). The slope is "
        "Theil–Sen's (median of pairwise slopes, robust to a few far plans), its interval assumes "
        "independent points (a rule method's seeds share one plan: optimistic). A slope s means a lead "
        "of 1 pp after BN recalibration is expected to be 1 − s pp after finetuning "
        "(`finetune_recovery.csv`).",
        "",
        markdown_table(display, headers, {"target": factor, "mean_gap_pp": "+.2f", "mean_gain_pp": "+.2f"}),
        "",
    ]
