"""Progress of the long steps (evaluation, BN recalibration, sensitivity, search, finetuning): bars and
time estimates.

One constructor, :func:`progress_bar`, so every bar behaves alike, and a no-op stand-in when progress is
off. In a terminal it is tqdm's text bar with an ETA, cleared when done (``leave=False``: the run's log
lines are the record, the bars only say how far a step is). When stderr is neither a terminal nor a
notebook (a redirected log file), a bar redraws at most every 30 s, so a long run's captured output
holds a few lines per step, not thousands.

In a Jupyter kernel (JupyterLab, VS Code, papermill) a bar is one line of text updated in place through
a display handle (:class:`_DisplayLine`), not an ipywidget: papermill saves display updates into the
executed notebook but not a widget's state (a widget bar was saved as ``0%| 0/148`` however far it
went), so the saved notebook shows each bar as it ended. A bar that runs longer than
:data:`HEARTBEAT_SECONDS` also prints its line to stdout every :data:`HEARTBEAT_SECONDS` and when it
ends: stream output, which ``papermill --log-output`` shows in the terminal while the notebook runs.

:class:`Estimate` says once, from the first measured units of a long step, how long the rest will take
(``search: 96 candidates × 2.1 s/candidate ≈ 3.4 min``); :func:`duration_text` formats durations.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any

from tqdm.auto import tqdm
from tqdm.std import tqdm as text_tqdm

__all__ = ["HEARTBEAT_SECONDS", "Estimate", "duration_text", "progress_bar"]

HEARTBEAT_SECONDS = 60.0
"""In a notebook kernel, how often a running bar prints its line to stdout (the papermill log's progress)."""


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


def _in_kernel() -> bool:
    """Whether this process is a Jupyter kernel (a notebook, or papermill executing one)."""
    if "ipykernel" not in sys.modules:
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def _redraw_interval() -> float:
    """Seconds between redraws: interactive (terminal or notebook kernel) fast, redirected output slow."""
    if "ipykernel" in sys.modules or getattr(sys.stderr, "isatty", lambda: False)():
        return 0.5
    return 30.0


class _DisplayLine:
    """The file a kernel's text bar draws into: each redraw replaces one displayed line of text.

    tqdm writes ``"\\r" + <bar>`` per redraw. The first redraw displays the text with a display id, later
    ones update it (what the executed notebook keeps). Every ``heartbeat`` seconds, and at :meth:`finish`
    of a bar that ran that long, the line also goes to ``out`` as a line of its own.

    Args:
        display: ``display(text) -> handle`` with ``handle.update(data, raw=True)`` (IPython's, by default).
        out: where heartbeat lines go (default: the kernel's stdout at write time).
    """

    encoding = "utf-8"

    def __init__(
        self,
        display: Callable[[str], Any] | None = None,
        out: Any = None,
        heartbeat: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._display, self._out, self._clock = display or _ipython_display, out, clock
        self._heartbeat = HEARTBEAT_SECONDS if heartbeat is None else heartbeat
        self._handle, self.text = None, ""
        self._start = self._beat = clock()

    def write(self, s: str) -> None:
        text = s.split("\r")[-1].strip("\n").rstrip()
        if not text:  # a line break or the clearing of a line: the displayed line stays
            return
        self.text = text
        if self._handle is None:
            self._handle = self._display(text)
        else:
            self._handle.update({"text/plain": text}, raw=True)
        now = self._clock()
        if now - self._beat >= self._heartbeat:
            self._beat = now
            self._print(text)

    def finish(self) -> None:
        """The bar ended: a bar that ran for a heartbeat or longer prints its last state (the papermill log)."""
        if self.text and self._clock() - self._start >= self._heartbeat:
            self._print(self.text)
            self._start = math.inf  # once

    def _print(self, text: str) -> None:
        out = self._out if self._out is not None else sys.stdout
        print(text, file=out, flush=True)

    def flush(self) -> None:
        pass


class _KernelBar(text_tqdm):
    """tqdm's text bar drawing into a :class:`_DisplayLine`, which it finishes when closed."""

    def close(self) -> None:
        super().close()
        self.fp.finish()


def _ipython_display(text: str) -> Any:
    from IPython.display import display

    return display({"text/plain": text}, raw=True, display_id=True)


def progress_bar(total: int | None, desc: str | None, unit: str = "it") -> tqdm | _NoBar:
    """A bar of ``total`` steps labelled ``desc``; ``desc=None`` means progress is off (a no-op bar).

    Use it as a context manager (``with progress_bar(n, "eval val") as bar: ... bar.update()``) or
    close it yourself. In a notebook kernel the bar is a line of text that stays, in its final state,
    when the step ends (see the module docstring).
    """
    if desc is None:
        return _NoBar()
    if _in_kernel():
        # position 0: each bar has a display line of its own, so no cursor moves between nested bars
        return _KernelBar(
            total=total, desc=desc, unit=unit, leave=True, ncols=100, mininterval=0.5, position=0, file=_DisplayLine()
        )
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        leave=False,
        dynamic_ncols=True,
        mininterval=_redraw_interval(),
    )


def duration_text(seconds: float) -> str:
    """``42 s``, ``3.5 min`` or ``2.1 h``: a duration as a person reads an estimate."""
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


class Estimate:
    """Says once, after the first units of a long step were measured, how long the rest will take.

    The first ``warmup`` units computed here are not timed (allocation, kernel selection, caches); the
    next ``measured`` give the seconds per unit, and ``say`` then gets
    ``"<what>: <left> <unit>s × <seconds>/<unit> ≈ <duration>"`` (or ``message(per_unit, left)``).
    Units read back rather than computed (a resumed run) are counted with :meth:`skip`, never timed.

    Args:
        what: the step, as the line names it (``"search guided x3"``).
        total: units in the whole step.
        unit: what a unit is (``"candidate"``, ``"step"``), singular.
        say: where the line goes (``None``: nowhere; :attr:`per_unit` is still measured).
        message: ``message(per_unit_seconds, units_left) -> line`` instead of the default line.
    """

    def __init__(
        self,
        what: str,
        total: int,
        unit: str,
        say: Callable[[str], None] | None,
        *,
        warmup: int = 1,
        measured: int = 3,
        message: Callable[[float, int], str] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.what, self.total, self.unit, self.say = what, int(total), unit, say
        self.warmup, self.measured, self.message, self.clock = warmup, measured, message, clock
        self.done = self.skipped = 0
        self.per_unit: float | None = None
        self._t0: float | None = None

    def skip(self, n: int = 1) -> None:
        """``n`` units that needed no work (read back): counted as done, not timed."""
        self.skipped += n

    def step(self, n: int = 1) -> None:
        """``n`` units computed since the last call; says the estimate once enough were timed."""
        for _ in range(n):
            self.done += 1
            if self.done == self.warmup:
                self._t0 = self.clock()
            elif self.done == self.warmup + self.measured and self.per_unit is None:
                self.per_unit = (self.clock() - self._t0) / self.measured
                left = self.total - self.skipped - self.done
                if self.say is not None and left > 0:
                    self.say(self._line(self.per_unit, left))

    def _line(self, per: float, left: int) -> str:
        if self.message is not None:
            return self.message(per, left)
        unit = self.unit if left == 1 else f"{self.unit}s"
        return f"{self.what}: {left} {unit} × {per:.2g} s/{self.unit} ≈ {duration_text(per * left)} left"
