"""Results analysis: run documents (``json/<model>/<run_id>.json``) to tables and plots.

The documents are written by :func:`common.run.documents.jsonify` (see :mod:`common.run.logs` for the record
kinds; :func:`common.run.documents.records_of` selects one kind). Conventions: accuracies are fractions in
[0, 1] in the data and the CSVs, shown in % in Markdown and plots; factors are dense / compressed.

Runs are never merged: every row carries its run's context (:data:`RUN_COLUMNS`: model, dataset,
checkpoint fingerprint, run id; :mod:`~common.analysis.context`), a configuration computed by two
runs is two rows, and comparisons (the policy's margins, Pareto fronts, the plots' panels) are
made within one run only. Within a run, when the same (method, decomposition, target, seed)
appears more than once (a resumed stage), the record written last (largest ``t``, then ``seq``)
wins; a row's dense baseline is its own run's, never another's.

Seeds: a run may compute every configuration at several seeds (``final.seed``). Records without a
``seed`` (older logs) take their run's ``config.seed`` (0 when absent). :func:`summary_table` keeps
one row per seed, :func:`aggregate_seeds` folds the seeds into mean, std and count, and
:func:`policy_margins` compares the policy with its best rival seed by seed, :func:`rival_margins` with
each rival.

Metric: every summary row's ``metric`` (``"macs"`` or ``"params"``, what the budget counts) is the
final record's own ``metric``; older logs carry it only in the run's ``config`` record, which then
holds for the whole run. A final record with neither is an error naming the run's log file.

Speed-ups have one source: the ``speedup`` dict of each ``final`` record (dense / compressed
median forward latency per setting, both measured by the run itself with
:func:`common.deploy.latency.fastest_latency` on its own machine when run with ``--latency``), split by
:func:`split_speedup` into the best CPU setting and the best CUDA one. That is the only measurement
made per run and per seed, of the very model the row describes; the latency tables of
``benchmarks/latency.py`` (``results/latency_{cpu,cuda}.csv``) time one plan per configuration
after the fact and are a report of their own (``results/latency_*.md``), no longer joined into the
summary. Runs without latency show "–".

Modules, by what they hold:

* :mod:`~common.analysis.context`: a run's context (dataset, checkpoint fingerprint), the runs
  table, panel titles.
* :mod:`~common.analysis.records`: loading documents, picking records (latest per key, baseline,
  seed), :func:`summary_table` (one row per final record) and :func:`split_speedup`.
* :mod:`~common.analysis.aggregate`: :func:`aggregate_seeds` (mean / std / count per
  configuration).
* :mod:`~common.analysis.margins`: the tables of paired per-seed margins of the policy over its rivals
  (:func:`policy_margins` against the best rival, :func:`rival_margins` against each, with the interval
  over seeds and test images where the hits are known).
* :mod:`~common.analysis.stats`: the statistics of those margins, on arrays: Student-t intervals
  (:func:`paired_interval`), the interval over seeds and test images (:func:`seed_image_interval`), what a
  design of n seeds and N test images can resolve (:func:`variance_components`, :func:`design_se`,
  :func:`detectable_margin`, :func:`images_needed`), :func:`bonferroni_level`.
* :mod:`~common.analysis.verdicts`: what an interval says (:func:`margin_verdict`, :func:`judged`,
  :func:`every_rival_verdict`; :func:`seed_image_margin`, everything one margin says with seeds and test
  images as samples).
* :mod:`~common.analysis.hits`: the finals' per-image test hits, from run documents and from the hits
  logs ``studies/image_noise/image_noise.py`` keeps (:func:`collect_hits`, :func:`is_hits_document`).
* :mod:`~common.analysis.recovery`: :func:`finetune_recovery`, how much of a plan's BN gap to the
  dense model finetuning recovers (Theil–Sen slope of gain on gap).
* :mod:`~common.analysis.markdown`: :func:`markdown_table`, cell formats, mean ± std cells.
* :mod:`~common.analysis.summary`: :func:`write_summary` (``summary.csv``,
  ``summary_seeds.csv``, ``policy_vs_rivals.csv``, ``finetune_recovery.csv``, ``summary.md``).
* :mod:`~common.analysis.readme`: the README results block between its marker lines.
* :mod:`~common.analysis.plots`: the per-model plots, listed once in :data:`PLOTS`
  (:mod:`~common.analysis.plot_accuracy`, :mod:`~common.analysis.plot_ranks`,
  :mod:`~common.analysis.plot_search`), each written as a PNG with the data it draws as a CSV of
  the same stem (:mod:`~common.analysis.figures`: figure helpers, :func:`save_plot`,
  :func:`pareto_front` and :func:`budget_front`).

Every public name is re-exported here: ``from common.analysis import X``.
"""

from __future__ import annotations

from common.analysis.aggregate import AGGREGATE_COLUMNS, SEED_STAT_COLUMNS, aggregate_seeds
from common.analysis.context import (
    RUN_COLUMNS,
    RUNS_COLUMNS,
    checkpoint_fingerprint,
    end_status,
    run_context,
    runs_table,
)
from common.analysis.figures import budget_front, pareto_front, save_plot
from common.analysis.hits import HITS_KIND, REPLICA_TOLERANCE, collect_hits, is_hits_document
from common.analysis.margins import (
    POLICY_MARGIN_COLUMNS,
    POLICY_METHODS,
    POLICY_RIVALS,
    RIVAL_MARGIN_COLUMNS,
    macs_pct,
    policy_margins,
    rival_margins,
)
from common.analysis.markdown import MARKDOWN_COLUMNS, markdown_table
from common.analysis.plot_accuracy import ACC_PLOT_COLUMNS
from common.analysis.plot_ranks import RANKS_PLOT_COLUMNS
from common.analysis.plot_search import SEARCH_PLOT_COLUMNS, SENSITIVITY_PLOT_COLUMNS
from common.analysis.plots import (
    PLOTS,
    make_plots,
    plot_acc_vs_macs,
    plot_ranks,
    plot_search_trace,
    plot_sensitivity,
)
from common.analysis.readme import (
    README_BEGIN,
    README_END,
    README_GRID,
    README_TABLE,
    readme_block,
    replace_marked_block,
    update_readme,
    verdict_grid,
)
from common.analysis.records import (
    METHOD_ORDER,
    SUMMARY_COLUMNS,
    latest_of,
    latest_plans,
    latest_records,
    load_runs,
    seed_lookup,
    split_speedup,
    summary_table,
)
from common.analysis.recovery import RECOVERY_COLUMNS, finetune_recovery
from common.analysis.stats import (
    bonferroni_level,
    design_se,
    detectable_margin,
    images_needed,
    paired_interval,
    seed_image_interval,
    variance_components,
)
from common.analysis.summary import write_summary
from common.analysis.verdicts import (
    SEED_IMAGE_COLUMNS,
    every_rival_verdict,
    judged,
    margin_verdict,
    seed_image_margin,
)

__all__ = [
    "ACC_PLOT_COLUMNS",
    "AGGREGATE_COLUMNS",
    "HITS_KIND",
    "REPLICA_TOLERANCE",
    "SEED_IMAGE_COLUMNS",
    "MARKDOWN_COLUMNS",
    "METHOD_ORDER",
    "PLOTS",
    "POLICY_MARGIN_COLUMNS",
    "POLICY_METHODS",
    "POLICY_RIVALS",
    "README_BEGIN",
    "README_GRID",
    "README_TABLE",
    "README_END",
    "RECOVERY_COLUMNS",
    "RANKS_PLOT_COLUMNS",
    "RUNS_COLUMNS",
    "RUN_COLUMNS",
    "SEARCH_PLOT_COLUMNS",
    "SEED_STAT_COLUMNS",
    "SENSITIVITY_PLOT_COLUMNS",
    "SUMMARY_COLUMNS",
    "aggregate_seeds",
    "bonferroni_level",
    "budget_front",
    "checkpoint_fingerprint",
    "collect_hits",
    "design_se",
    "detectable_margin",
    "every_rival_verdict",
    "finetune_recovery",
    "images_needed",
    "is_hits_document",
    "judged",
    "latest_of",
    "latest_plans",
    "latest_records",
    "load_runs",
    "macs_pct",
    "make_plots",
    "margin_verdict",
    "markdown_table",
    "paired_interval",
    "pareto_front",
    "plot_acc_vs_macs",
    "plot_ranks",
    "plot_search_trace",
    "plot_sensitivity",
    "policy_margins",
    "rival_margins",
    "seed_image_interval",
    "seed_image_margin",
    "variance_components",
    "RIVAL_MARGIN_COLUMNS",
    "readme_block",
    "replace_marked_block",
    "end_status",
    "run_context",
    "runs_table",
    "save_plot",
    "seed_lookup",
    "split_speedup",
    "summary_table",
    "update_readme",
    "verdict_grid",
    "write_summary",
]
