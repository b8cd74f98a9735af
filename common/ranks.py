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
"""
from __future__ import annotations

import math
from typing import Sequence, Union

RankSpec = Union[int, float, Sequence[int]]

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


def validate_ranks(method: str, weight_shape: Sequence[int], ranks: Sequence[int], layer: str = "<layer>") -> tuple[int, ...]:
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


def ranks_from_level(method: str, weight_shape: Sequence[int], level: float, multiple: int = 1) -> tuple[int, ...]:
    """Map one scalar *level* in (0, 1] to concrete ranks, monotone non-decreasing in ``level``.

    HT-2: ``R1 = level*C``, ``R3 = level*T``, ``R13 = level*min(R1*kh, R3*kw)``, so level 1 is exact.
    Tucker-2: ``R1 = level*C``, ``R3 = level*T``. SVD: ``R = level*min(C, T)``. Each rank is rounded up
    with :func:`round_rank`.
    """
    if not (isinstance(level, (int, float)) and 0.0 < float(level) <= 1.0):
        raise ValueError(f"a rank level must be a fraction in (0, 1], got {level!r}")
    t, c, kh, kw = (int(v) for v in weight_shape)
    if method == "ht2":
        r1 = round_rank(level * c, c, multiple)
        r3 = round_rank(level * t, t, multiple)
        full13 = min(r1 * kh, r3 * kw)
        return (r1, r3, round_rank(level * full13, full13, multiple))
    if method == "tucker2":
        return (round_rank(level * c, c, multiple), round_rank(level * t, t, multiple))
    if method == "svd":
        full = min(c, t)
        return (round_rank(level * full, full, multiple),)
    if method == "dense":
        return ()
    raise ValueError(f"unknown decomposition method {method!r}; expected one of {METHODS}")


def resolve_ranks(method: str, weight_shape: Sequence[int], rank: RankSpec, layer: str = "<layer>", multiple: int = 1) -> tuple[int, ...]:
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
