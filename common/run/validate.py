"""The ranges of :class:`common.run.config.ExperimentConfig`'s fields, checked before any data or model work.

:data:`RANGES` holds every numeric field's range (its bound, whether it may be ``None``, whether a
list field must hold at least one item); :func:`check_ranges` applies them, and
:func:`check_relations` what ties fields together (``finetune_targets`` within ``targets``,
``latency_devices`` within cpu/cuda). A value out of range is a ``ValueError`` naming the field, the
range and the value (on the command line: a usage error, exit 2), raised while the config is
built: before a log is opened, so a refused run writes nothing and a corrected one starts cleanly.
Choices, types and the search options' own bounds are checked where they are defined
(:mod:`common.run.config`, :class:`common.search.options.SearchConfig`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from common.search.options import check_target

__all__ = ["LATENCY_DEVICES", "RANGES", "Range", "check_ranges", "check_relations"]

LATENCY_DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class Range:
    """A number's admissible range: ``low`` / ``high`` (None: unbounded), each excluded when ``*_open``;
    always finite. ``whole``: an integer count. ``many``: a list field, each item in range and at least one."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    whole: bool = False
    many: bool = False

    def words(self) -> str:
        """The range in words: ``at least 1``, ``> 0 and finite``, ``in (0, 1)``."""
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None and self.whole and not self.low_open:
            return f"at least {self.low:g}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g} and finite"
        return "a finite number"

    def holds(self, value: float) -> bool:
        """Whether ``value`` (a number) lies in the range."""
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)


RANGES: dict[str, Range] = {
    "crop_size": Range(1, whole=True),
    "resize_size": Range(1, whole=True),
    "search_budget": Range(1, whole=True),
    "n_seeds": Range(1, whole=True),
    "final_calib_images": Range(2, whole=True),
    "calib_images": Range(2, whole=True),
    "finetune_lr": Range(0, low_open=True),
    "finetune_clip": Range(0, low_open=True),
    "finetune_warmup": Range(0, 1, low_open=True, high_open=True),
    "finetune_batch_size": Range(1, whole=True),
    "finetune_max_images": Range(1, whole=True),
    "val_images": Range(1, whole=True),  # 0 (the whole split) is None by then
    "sensitivity_levels": Range(0, 1, low_open=True, high_open=True, many=True),
    "policy_rounds": Range(1, whole=True),
    "temperature": Range(0, low_open=True),
    "rank_multiple": Range(1, whole=True),
    "latency_batches": Range(1, whole=True, many=True),
    "latency_threads": Range(1, whole=True),
    "seed": Range(0, whole=True),
    "threads": Range(1, whole=True),
    "deadline": Range(),
}
"""Each numeric field's range (a ``None`` value, where the field allows it, means off or the default).
Fields with bounds of their own words are checked elsewhere: ``targets`` (each > 1,
:func:`common.search.options.check_target`), ``budget_tol`` (:func:`common.search.options.check_budget_tol`),
``finetune_epochs`` (>= 0, 0 = off), and the search options ``rerank``, ``rescore``, ``rescore_images``,
``refine`` and ``shapes`` (:class:`common.search.options.SearchConfig`, which every search checks)."""


def check_ranges(values: dict[str, Any]) -> None:
    """Every :data:`RANGES` field of ``values`` (field -> value, types already checked) in its range.

    Raises:
        ValueError: ``<field> must be <range>, got <value>`` for the first field out of range (a list
            field: the item out of range, or an empty list).
    """
    for name, rng in RANGES.items():
        value = values[name]
        if value is None:
            continue
        items: Sequence = value if rng.many else (value,)
        if rng.many and not items:
            raise ValueError(f"{name} must hold at least one value {rng.words()}, got none")
        for item in items:
            if not rng.holds(float(item)):
                held = f" (item {item!r})" if rng.many else ""
                raise ValueError(f"{name} must be {rng.words()}, got {value!r}{held}")


def check_relations(values: dict[str, Any]) -> None:
    """What ties fields together: ``finetune_targets`` each a target the run has (``targets``),
    ``data_root`` given for ``dataset`` imagefolder, and ``latency_devices`` a non-empty subset of
    :data:`LATENCY_DEVICES`.

    Raises:
        ValueError: naming the field and the offending values.
    """
    if values["finetune_targets"] is not None:
        wanted = [check_target(t) for t in values["finetune_targets"]]
        have = {float(t) for t in values["targets"]}
        outside = [t for t in wanted if t not in have]
        if outside:
            raise ValueError(
                f"finetune_targets must be among targets {[float(t) for t in values['targets']]}; "
                f"{', '.join(f'{t:g}' for t in outside)} is not (a plan is finetuned at a target the run compresses to)"
            )
    if values["dataset"] == "imagefolder" and values["data_root"] is None:
        raise ValueError("data_root: --dataset imagefolder needs --data-root DIR (with train/ val/ test/ in it)")
    devices = values["latency_devices"]
    bad = [d for d in devices if d not in LATENCY_DEVICES]
    if bad or not devices:
        raise ValueError(f"latency_devices must be a non-empty subset of {', '.join(LATENCY_DEVICES)}, got {devices!r}")
