"""Ranks: one validated concept for every decomposition.

A *method* is one of ``"ht2"``, ``"tucker2"``, ``"svd"`` or ``"dense"``; its concrete ranks are a tuple
of ints in a fixed order:

- ``"ht2"``: ``(R1, R3, R13)``: leaf rank of the input-channel mode C, leaf rank of the output-channel
  mode T, and the rank of the edge joining the {C, kh} and {T, kw} subtrees.
- ``"tucker2"``: ``(R1, R3)``: Tucker-2 ranks of the C and T modes.
- ``"svd"``: ``(R,)``: rank of a 1×1 conv's (T, C) matrix.
- ``"dense"``: ``()``: the layer is kept as it is.

A rank *spec* given by a user is an int (every rank equal to it), a float in (0, 1] (a *level*: the
same fraction of every mode, see :func:`ranks_from_level`) or a tuple of ints in the order above.

Every rule that turns real-valued per-mode ranks into a rank tuple (a level, an energy threshold,
scaled EVBMF ranks) goes through :func:`rounded_ranks`; the rules that read a kernel's spectra
(:func:`energy_ranks`, :func:`evbmf_ranks`) take a :class:`common.decompose.ht.KernelSpectra` (typed as
:class:`common.decompose.types.Spectra`: ht imports this module).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from common.decompose.evbmf import evbmf_rank_from_singular_values

if TYPE_CHECKING:
    import torch

    from common.decompose.types import Spectra

RankSpec = int | float | Sequence[int]
# raw(rank name, its full value, the ranks rounded so far) -> unrounded rank; see rounded_ranks
RawRank = Callable[[str, int, tuple], float]

METHODS = ("ht2", "tucker2", "svd", "dense")
RANK_NAMES = {"ht2": ("R1", "R3", "R13"), "tucker2": ("R1", "R3"), "svd": ("R",), "dense": ()}


def rank_bounds(method: str, weight_shape: Sequence[int], ranks: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """Allowed inclusive range of each rank of ``method`` for a per-group kernel ``(T, C, kh, kw)``.

    For ``ht2`` the bound of R13 depends on the chosen R1 and R3 (``min(R1*kh, R3*kw)``), so pass
    ``ranks`` to get it; without them the bound for full R1 and R3 is returned.
    """
    if method not in METHODS:
        raise ValueError(f"unknown decomposition method {method!r}; expected one of {METHODS}")
    t, c, kh, kw = (int(v) for v in weight_shape)
    if method == "ht2":
        r1, r3 = (ranks[0], ranks[1]) if ranks is not None else (c, t)
        return [(1, c), (1, t), (1, max(1, min(r1 * kh, r3 * kw)))]
    if method == "tucker2":
        return [(1, c), (1, t)]
    if method == "svd":
        if kh * kw != 1:
            raise ValueError(f"svd decomposition needs a 1x1 kernel, got {kh}x{kw}")
        return [(1, min(c, t))]
    return []


def full_ranks(method: str, weight_shape: Sequence[int]) -> tuple[int, ...]:
    """The ranks at which ``method`` reproduces the kernel exactly."""
    t, c, kh, kw = (int(v) for v in weight_shape)
    if method == "ht2":
        return (c, t, min(c * kh, t * kw))
    if method == "tucker2":
        return (c, t)
    if method == "svd":
        return (min(c, t),)
    if method == "dense":
        return ()
    raise ValueError(f"unknown decomposition method {method!r}; expected one of {METHODS}")


def validate_ranks(
    method: str, weight_shape: Sequence[int], ranks: Sequence[int], layer: str = "<layer>"
) -> tuple[int, ...]:
    """Check ``ranks`` against :func:`rank_bounds`; raise ``ValueError`` naming layer, rank and range."""
    names = RANK_NAMES.get(method)
    if names is None:
        raise ValueError(f"layer {layer!r}: unknown decomposition method {method!r}; expected one of {METHODS}")
    ranks = tuple(ranks)
    if len(ranks) != len(names):
        raise ValueError(f"layer {layer!r}: method {method!r} takes {len(names)} ranks {names}, got {ranks!r}")
    out = []
    for v in ranks:
        if isinstance(v, bool) or not float(v).is_integer():
            raise ValueError(f"layer {layer!r}: ranks must be integers, got {ranks!r}")
        out.append(int(v))
    try:
        bounds = rank_bounds(method, weight_shape, out)
    except ValueError as e:  # e.g. svd on a k×k kernel: name the layer too
        raise ValueError(f"layer {layer!r}: {e}") from None
    for name, v, (lo, hi) in zip(names, out, bounds):
        if not lo <= v <= hi:
            raise ValueError(
                f"layer {layer!r}: {method} rank {name}={v} is out of range [{lo}, {hi}] "
                f"for per-group kernel (T, C, kh, kw)={tuple(int(s) for s in weight_shape)}"
            )
    return tuple(out)


def round_rank(r: float, full: int, multiple: int = 8) -> int:
    """Round a rank up to a hardware-friendly multiple where the mode is wide enough.

    Modes narrower than ``2 * multiple`` keep exact ranks (rounding there would be a large relative
    jump); the result is always in ``[1, full]``.
    """
    r = max(1, math.ceil(r - 1e-9))
    if multiple > 1 and full >= 2 * multiple:
        r = multiple * math.ceil(r / multiple)
    return int(min(max(r, 1), full))


def rounded_ranks(method: str, weight_shape: Sequence[int], raw: RawRank, multiple: int = 1) -> tuple[int, ...]:
    """Ranks of ``method`` from one real-valued rank per mode, each rounded up with :func:`round_rank`.

    The one place that knows how a method's ranks are assembled: ``raw(name, full, done)`` gives the
    unrounded value of rank ``name`` (``RANK_NAMES[method]``, in order), where ``full`` is its exact
    (cap) value and ``done`` the ranks already rounded (so ``len(done)`` is its index). HT-2's R13 is
    asked for last, with ``full = min(R1*kh, R3*kw)`` of the rounded R1 and R3.
    """
    t, c, kh, kw = (int(v) for v in weight_shape)
    if method == "svd":
        full = min(c, t)
        return (round_rank(raw("R", full, ()), full, multiple),)
    if method in ("ht2", "tucker2"):
        r1 = round_rank(raw("R1", c, ()), c, multiple)
        r3 = round_rank(raw("R3", t, (r1,)), t, multiple)
        if method == "tucker2":
            return (r1, r3)
        full13 = min(r1 * kh, r3 * kw)
        return (r1, r3, round_rank(raw("R13", full13, (r1, r3)), full13, multiple))
    if method == "dense":
        return ()
    raise ValueError(f"unknown decomposition method {method!r}; expected one of {METHODS}")


def ranks_from_level(method: str, weight_shape: Sequence[int], level: float, multiple: int = 1) -> tuple[int, ...]:
    """Map one scalar *level* in (0, 1] to concrete ranks, monotone non-decreasing in ``level``.

    HT-2: ``R1 = level*C``, ``R3 = level*T``, ``R13 = level*min(R1*kh, R3*kw)``, so level 1 is exact.
    Tucker-2: ``R1 = level*C``, ``R3 = level*T``. SVD: ``R = level*min(C, T)``. Each rank is rounded up
    with :func:`round_rank`.
    """
    if not (isinstance(level, (int, float)) and 0.0 < float(level) <= 1.0):
        raise ValueError(f"a rank level must be a fraction in (0, 1], got {level!r}")
    return rounded_ranks(method, weight_shape, lambda name, full, done: level * full, multiple)


def resolve_ranks(
    method: str, weight_shape: Sequence[int], rank: RankSpec, layer: str = "<layer>", multiple: int = 1
) -> tuple[int, ...]:
    """Turn a rank spec (int, fraction or tuple) into validated concrete ranks for one layer.

    Args:
        method: ``"ht2"``, ``"tucker2"``, ``"svd"`` or ``"dense"``.
        weight_shape: per-group kernel shape ``(T, C, kh, kw)``.
        rank: int (all ranks equal), float in (0, 1] (a level, :func:`ranks_from_level`) or tuple.
        layer: name used in error messages.
        multiple: rounding multiple for levels.
    """
    if method == "dense":
        return ()
    if isinstance(rank, bool):
        raise ValueError(f"layer {layer!r}: invalid rank {rank!r}")
    if isinstance(rank, float):
        try:
            return ranks_from_level(method, weight_shape, rank, multiple)
        except ValueError as e:
            raise ValueError(f"layer {layer!r}: {e}") from None
    if isinstance(rank, int):
        n = len(RANK_NAMES[method]) if method in RANK_NAMES else 0
        return validate_ranks(method, weight_shape, (rank,) * n, layer)
    if isinstance(rank, Sequence) and not isinstance(rank, str):
        return validate_ranks(method, weight_shape, tuple(rank), layer)
    raise ValueError(f"layer {layer!r}: rank must be an int, a fraction in (0, 1] or a tuple, got {rank!r}")


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank whose leading singular values keep at least ``energy`` of the squared sum.

    ``singular_values`` is (n,) or (G, n); for groups the largest rank over groups is returned.
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy threshold must be in (0, 1], got {energy!r}")
    s2 = singular_values.double().reshape(-1, singular_values.shape[-1]).pow(2)
    total = s2.sum(-1, keepdim=True).clamp_min(1e-300)
    frac = s2.cumsum(-1) / total
    ranks = (frac < energy - 1e-12).sum(-1) + 1
    return int(min(int(ranks.max()), singular_values.shape[-1]))


def _mode_spectrum(spectra: Spectra, name: str, done: tuple) -> tuple[torch.Tensor, int, int, str]:
    """(singular values (G, n), rows, cols, description) of the matrix whose rank ``name`` sets."""
    t, c, kh, kw = spectra.kernel_shape
    if name == "R":
        return spectra.s3[:, : min(c, t)], t, c, "the 1x1 kernel"
    if name == "R1":
        return spectra.s1, c, t * kh * kw, "the C-mode unfolding"
    if name == "R3":
        return spectra.s3, t, c * kh * kw, "the T-mode unfolding"
    r1, r3 = done
    return spectra.core_spectrum(r1, r3), r1 * kh, r3 * kw, "the HT-2 core"


def energy_ranks(spectra: Spectra, method: str, energy: float, multiple: int = 1) -> tuple[int, ...]:
    """Per-unfolding energy threshold (the HT-2 paper's rule): each rank keeps ``energy`` of its own
    spectrum (R13 that of the core for the rounded R1, R3), rounded up with :func:`round_rank`."""
    return rounded_ranks(
        method,
        spectra.kernel_shape,
        lambda name, full, done: energy_rank(_mode_spectrum(spectra, name, done)[0], energy),
        multiple,
    )


def evbmf_ranks(spectra: Spectra, method: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """EVBMF ranks of each unfolding (Kim et al. 2016's rule; R13 from the core at those R1, R3).

    For groups the largest singular value over groups is analysed. A matrix where EVBMF keeps nothing
    gets rank 1; where EVBMF fails it gets rank 1 too, with a warning naming the layer.

    Returns:
        ``(ranks, rank0)``: the ranks, and the matrices where EVBMF found rank 0 (e.g.
        ``"the C-mode unfolding"``; empty when none), for the caller to report (one warning per plan
        rather than one per layer: :func:`common.search.rules.evbmf_base`).
    """
    rank0: list[str] = []

    def raw(name: str, full: int, done: tuple) -> int:
        s, rows, cols, what = _mode_spectrum(spectra, name, done)
        try:
            r = evbmf_rank_from_singular_values(s.max(0).values[: min(rows, cols)].numpy(), rows, cols).rank
        except (ValueError, FloatingPointError) as e:
            warnings.warn(f"layer {spectra.name!r}: EVBMF failed on {what} ({e}); using rank 1", stacklevel=2)
            return 1
        if r == 0:
            rank0.append(what)
        return max(int(r), 1)

    # EVBMF ranks are within [1, full]: kept as they are
    return rounded_ranks(method, spectra.kernel_shape, raw), tuple(rank0)
