"""Progress bars for the long steps (evaluation, BN recalibration, sensitivity, search, finetuning).

One constructor, :func:`progress_bar`, so every bar behaves alike: ``tqdm.auto`` (a widget in Jupyter
and papermill, text with an ETA in a terminal), cleared when done (``leave=False``: the run's log lines
are the record, the bars only say how far a step is), and a no-op stand-in when progress is off. When
stderr is neither a terminal nor a notebook (a redirected log file), a bar redraws at most every
30 s, so a long run's captured output holds a few lines per step, not thousands.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm


class _NoBar:
    """What :func:`progress_bar` returns when progress is off: the bar methods, doing nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_description(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _redraw_interval() -> float:
    """Seconds between redraws: interactive (terminal or notebook kernel) fast, redirected output slow."""
    if "ipykernel" in sys.modules or getattr(sys.stderr, "isatty", lambda: False)():
        return 0.5
    return 30.0


def progress_bar(total: int | None, desc: str | None, unit: str = "it") -> tqdm | _NoBar:
    """A bar of ``total`` steps labelled ``desc``; ``desc=None`` means progress is off (a no-op bar).

    Use it as a context manager (``with progress_bar(n, "eval val") as bar: ... bar.update()``) or
    close it yourself.
    """
    if desc is None:
        return _NoBar()
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        leave=False,
        dynamic_ncols=True,
        mininterval=_redraw_interval(),
    )
