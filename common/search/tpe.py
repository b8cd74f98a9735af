"""TPE (Tree-structured Parzen Estimator) over per-layer level indices: the rival rank search.

What TPE is
-----------
TPE (Bergstra, Bardenet, Bengio and Kégl, "Algorithms for Hyper-Parameter Optimization", NeurIPS
2011) is a sequential model-based optimizer. After a few random *startup* trials it splits the
history into the best ``gamma`` fraction ("good") and the rest ("bad"), fits a Parzen (kernel)
density ``l(x)`` to the good points and ``g(x)`` to the bad ones, draws candidates from ``l`` and
evaluates the one that maximizes ``l(x) / g(x)`` (which is proportional to expected improvement).
For categorical variables the kernels are smoothed histograms over the choices. The *multivariate*
variant models the joint density of all variables instead of one independent density per variable,
so it can pick up interactions between layers (Watanabe, "Tree-Structured Parzen Estimator:
Understanding Its Algorithm Components and Their Roles for Better Empirical Performance", 2023).

Why it is the rival
-------------------
It is what a practitioner tries first on a discrete, black-box, moderately-sized search space:
``optuna``'s default sampler, no gradient, no surrogate to tune. A rank-selection method that does
not beat TPE at the same number of evaluations has not earned its complexity, so the experiments
run it with the same evaluation budget as the other searches.

Contract
--------
:func:`tpe_search` knows nothing about ranks, costs or models. It proposes one *index* per layer,
``indices[i] in range(num_choices[i])``; the caller owns the level grid those indices point into,
maps them to ranks, projects the plan onto its compute budget, evaluates it and returns
``(score, counted)`` (higher score is better) or ``None`` for an infeasible draw. ``counted`` is
``False`` when the projected plan was already evaluated: TPE still learns the score, but the
duplicate does not consume the evaluation budget. The search stops after ``n_evals`` counted
evaluations or ``max_trials`` proposals, whichever comes first, and returns the whole history.

Given the same ``seed`` and the same objective values, the proposals are identical, so an
interrupted search resumes by replaying its recorded scores through a fresh call.
"""

from __future__ import annotations

import contextlib
import math
import operator
import warnings
from collections.abc import Callable, Iterator, Sequence

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.exceptions import ExperimentalWarning
from optuna.samplers import TPESampler
from optuna.trial import TrialState

__all__ = ["tpe_search"]


def _as_int(name: str, value: object, minimum: int) -> int:
    # operator.index accepts numpy integers (callers often build num_choices with numpy) but
    # rejects floats; bools are ints to Python yet always a caller bug here.
    try:
        if isinstance(value, bool):
            raise TypeError
        out = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}") from None
    if out < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return out


def _check_inputs(
    num_choices: Sequence[int], n_evals: int, n_startup: int, max_trials: int | None
) -> tuple[list[int], int, int, int | None]:
    choices = [_as_int(f"num_choices[{i}]", n, 1) for i, n in enumerate(num_choices)]
    if not choices:
        raise ValueError("num_choices must name at least one layer, got an empty sequence")
    n_evals = _as_int("n_evals", n_evals, 1)
    n_startup = _as_int("n_startup", n_startup, 0)
    if max_trials is not None:
        max_trials = _as_int("max_trials", max_trials, 1)
    return choices, n_evals, n_startup, max_trials


def tpe_search(
    num_choices: Sequence[int],
    objective: Callable[[list[int]], tuple[float, bool] | None],
    n_evals: int,
    seed: int,
    *,
    n_startup: int = 10,
    max_trials: int | None = None,
    multivariate: bool = True,
) -> list[dict]:
    """Maximize ``objective`` over one categorical index per layer with optuna's TPE sampler.

    Args:
        num_choices: Length ``L`` (number of layers). ``num_choices[i] >= 1`` is the number of
            options of layer ``i``; its index ranges over ``0 .. num_choices[i] - 1``.
        objective: Called with ``indices``, a ``list[int]`` of length ``L``. Returns
            ``(score, counted)``: ``score`` a finite ``float``, higher is better; ``counted`` a
            ``bool``, ``False`` if the caller had already evaluated the same (projected) plan.
            Returns ``None`` if the point is infeasible.
        n_evals: Number of counted evaluations to run, ``>= 1``.
        seed: Seed of the sampler; same seed and same objective values give the same proposals.
        n_startup: Number of random proposals before TPE takes over (optuna's
            ``n_startup_trials``; infeasible and duplicate trials count towards it too).
        max_trials: Upper bound on proposals, counted or not (default ``20 * n_evals``), so that a
            search stuck on duplicates or infeasible points terminates.
        multivariate: Joint (``True``) or per-layer independent (``False``) Parzen estimators.

    Returns:
        The history, one ``dict`` per proposal in order::

            {"trial": int,             # 0-based proposal number
             "indices": list[int],     # length L
             "score": float | None,    # None when infeasible
             "counted": bool}          # False for duplicates and infeasible points

    Raises:
        ValueError: On bad arguments (the message names the argument) or a non-finite score.
    """
    choices, n_evals, n_startup, max_trials = _check_inputs(num_choices, n_evals, n_startup, max_trials)
    if max_trials is None:
        max_trials = 20 * n_evals

    # Zero-padded names so that optuna's name-sorted view of the search space is layer order.
    width = len(str(len(choices) - 1))
    names = [f"layer{i:0{width}d}" for i in range(len(choices))]
    space = {name: CategoricalDistribution(tuple(range(n))) for name, n in zip(names, choices)}

    history: list[dict] = []
    with _quiet_optuna():
        sampler = TPESampler(seed=seed, n_startup_trials=n_startup, multivariate=multivariate)
        study = optuna.create_study(direction="maximize", sampler=sampler)
        n_counted = 0
        for k in range(max_trials):
            if n_counted >= n_evals:
                break
            history.append(_trial(study, space, names, objective, k))
            n_counted += history[-1]["counted"]
    return history


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Run a block with optuna's per-trial INFO lines and its ``ExperimentalWarning`` silenced.

    The verbosity is lowered only while the block runs, so a caller who chose one (or a notebook that
    imports this module) keeps its own setting; older optuna versions flag ``multivariate`` as
    experimental, which says nothing actionable here.
    """
    previous_verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(previous_verbosity)


def _trial(
    study: optuna.Study,
    space: dict[str, CategoricalDistribution],
    names: Sequence[str],
    objective: Callable[[list[int]], tuple[float, bool] | None],
    k: int,
) -> dict:
    """Ask ``study`` for proposal ``k``, evaluate it with ``objective``, tell the result; its history entry."""
    trial = study.ask(space)
    indices = [int(trial.params[name]) for name in names]
    result = objective(indices)
    if result is None:
        # PRUNED, not FAIL: TPE ignores FAIL trials entirely, so it would keep proposing the
        # infeasible region. A PRUNED trial without intermediate values is ranked below every
        # COMPLETE trial, i.e. it lands in the "bad" density g(x) and steers proposals away from it.
        study.tell(trial, state=TrialState.PRUNED)
        return {"trial": k, "indices": indices, "score": None, "counted": False}
    score, counted = result
    score = float(score)
    if not math.isfinite(score):
        raise ValueError(
            f"objective returned a non-finite score {score!r} for indices {indices}; return None for infeasible points"
        )
    counted = bool(counted)
    # Duplicates are told as well: the caller's projection maps many index vectors to one plan, and
    # TPE should learn that all of them score the same.
    study.tell(trial, score)
    return {"trial": k, "indices": indices, "score": score, "counted": counted}
