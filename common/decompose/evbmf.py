"""Empirical variational Bayesian matrix factorization (EVBMF) rank estimation.

Implements the global analytic EVBMF solution of Nakajima, Sugiyama, Babacan & Tomioka,
"Global analytic solution of fully-observed variational Bayesian matrix factorization",
JMLR 14 (2013), which Kim et al. (ICLR 2016) use to choose Tucker-2 ranks from the mode
unfoldings of convolution kernels.

Notation (paper's): the observed matrix ``Y`` is ``L x M`` with ``L <= M`` (transposed
otherwise), ``alpha = L / M``, ``gamma_h`` its singular values in descending order and
``sigma^2`` the noise variance per entry. With ``x = gamma^2 / (M sigma^2)`` and

    tau(x) = (x - (1 + alpha) + sqrt((x - (1 + alpha))^2 - 4 alpha)) / 2,

a component is kept iff ``x > x_bar = (1 + tau_bar)(1 + alpha / tau_bar)``, where ``tau_bar``
is the positive zero of ``Psi(tau) = log(tau + 1) + alpha log(tau / alpha + 1) - tau``. The
kept singular value is shrunk to ``gamma * tau(x) / x``. The noise variance ``sigma^2`` is
estimated as the minimiser of the (``M``-scaled) free energy

    F(sigma^2) = L log sigma^2 + sum_h gamma_h^2 / (M sigma^2) + sum_{h: x_h > x_bar} Psi(tau(x_h))

over ``[sigma2_lower, sigma2_upper]`` with ``sigma2_upper = ||Y||_F^2 / (L M)`` and
``sigma2_lower = max(gamma_{H_bar+1}^2 / (M x_bar), sum_{h > H_bar} gamma_h^2 / (M (L - H_bar)))``,
``H_bar = ceil(L / (1 + alpha)) - 1`` being the largest rank EVB can return.

Only numpy is used (no scipy): the 1-D minimisation is a log-spaced grid search followed by
bisection on the analytic slope next to the best grid point, so that the global minimum of a
piecewise-smooth, possibly multi-modal objective is found rather than whichever local minimum
a bracketing method hits. The result matches the fixed point of the classic iterative EVB
updates (checked in tests/test_evbmf.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

__all__ = ["EVBMFResult", "evbmf_rank_from_singular_values"]

# Number of log-spaced sigma^2 candidates scanned before refinement by slope bisection.
_GRID_POINTS = 400
# Relative floor on sigma^2 (w.r.t. its upper bound): a noiseless low-rank matrix drives the
# free energy to -inf as sigma^2 -> 0. The floor keeps logs finite and sits far above SVD
# round-off (~1e-32 relative), so sigma^2 and the rank stay scale-equivariant; the price is
# that components below ~1e-6 of the RMS singular value are never kept.
_SIGMA2_REL_FLOOR = 1e-12


@dataclass(frozen=True, eq=False)
class EVBMFResult:
    """Outcome of an EVBMF analysis.

    Attributes:
        rank: number of components EVB keeps (0 when nothing exceeds the threshold).
        sigma2: the estimated noise variance per matrix entry.
        singular_values: shape ``(rank,)``, the EVB (shrunk) estimates of the kept singular
            values, descending. Read-only.
        threshold: observed singular values strictly above this are kept,
            ``sqrt(M * sigma2 * x_bar)``.
    """

    rank: int
    sigma2: float
    singular_values: np.ndarray
    threshold: float


@lru_cache(maxsize=256)
def _tau_bar(alpha: float) -> float:
    """Positive zero of Psi(tau) = log(tau+1) + alpha*log(tau/alpha+1) - tau (0 < alpha <= 1).

    Psi(0) = 0 with Psi'(0) = 1 and Psi is concave, so the positive zero is unique; the paper
    shows sqrt(alpha) < tau_bar, and Psi(10) < 0 for every alpha in (0, 1].
    """

    def psi(t: float) -> float:
        return math.log1p(t) + alpha * math.log1p(t / alpha) - t

    lo, hi = math.sqrt(alpha), 10.0
    while psi(lo) <= 0.0:  # defensive: never triggers for alpha in (0, 1]
        lo *= 0.5
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if psi(mid) > 0.0:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * hi:
            break
    return 0.5 * (lo + hi)


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    """tau(x) for x >= (1 + sqrt(alpha))^2 (clipped discriminant guards round-off)."""
    b = x - (1.0 + alpha)
    return 0.5 * (b + np.sqrt(np.maximum(b * b - 4.0 * alpha, 0.0)))


def _free_energy(
    log_s2: np.ndarray, s2_top: np.ndarray, tail_s2: float, L: int, M: int, alpha: float, x_bar: float
) -> np.ndarray:
    """M-scaled EVB free energy (up to constants) at each ``log sigma^2`` in ``log_s2``.

    For a kept component ``x + Psi(tau(x))`` is evaluated as
    ``1 + alpha + alpha/tau + log(1+tau) + alpha*log(1+tau/alpha)`` (using
    ``x = tau + 1 + alpha + alpha/tau``): the naive form cancels two terms of size ``x``,
    which loses all precision when sigma^2 is tiny (nearly noiseless matrices).

    Args:
        log_s2: shape ``(G,)``, candidate values of ``log sigma^2``.
        s2_top: shape ``(K,)``, squared singular values that may be kept.
        tail_s2: sum of the remaining squared singular values (never kept).
    Returns:
        shape ``(G,)``.
    """
    sigma2 = np.exp(log_s2)
    energy = L * log_s2 + tail_s2 / (M * sigma2)
    if s2_top.size:
        x = s2_top[None, :] / (M * sigma2[:, None])
        kept = x > x_bar
        tau = _tau(np.where(kept, x, x_bar), alpha)
        kept_energy = 1.0 + alpha + alpha / tau + np.log1p(tau) + alpha * np.log1p(tau / alpha)
        energy = energy + np.where(kept, kept_energy, x).sum(axis=1)
    return energy


def _free_energy_slope(
    log_s2: float, s2_top: np.ndarray, tail_s2: float, L: int, M: int, alpha: float, x_bar: float
) -> float:
    """d F / d log(sigma^2) of :func:`_free_energy` at one point (piecewise smooth: it jumps
    where a component crosses the threshold, which sign bisection tolerates)."""
    sigma2 = math.exp(log_s2)
    x = s2_top / (M * sigma2)
    kept = x > x_bar
    slope = L - tail_s2 / (M * sigma2) - float(np.sum(x[~kept]))
    if np.any(kept):
        xk = x[kept]
        tau = _tau(xk, alpha)
        dg_dtau = 1.0 / (1.0 + tau) + alpha / (alpha + tau) - alpha / tau**2
        # dx/dt = -x and dtau/dx = tau^2 / (tau^2 - alpha), finite as tau > tau_bar > sqrt(alpha).
        slope -= float(np.sum(xk * tau**2 / (tau**2 - alpha) * dg_dtau))
    return slope


def _bisect_slope(slope: Callable[[float], float], a: float, b: float) -> float:
    """Local minimiser on ``[a, b]`` from the sign of the slope: reaches full float precision,
    which comparing values of a function that is flat at its minimum cannot."""
    if slope(a) >= 0.0:
        return a
    if slope(b) <= 0.0:
        return b
    for _ in range(200):
        mid = 0.5 * (a + b)
        if mid <= a or mid >= b:
            break
        if slope(mid) < 0.0:
            a = mid
        else:
            b = mid
    return 0.5 * (a + b)


def _estimate_sigma2(s: np.ndarray, L: int, M: int, alpha: float, x_bar: float, n_keep_max: int) -> float:
    """Global minimiser of the free energy over the paper's sigma^2 interval.

    ``s`` is normalised so that ``sum(s**2) == L*M`` (upper bound 1), which makes the result
    equivariant under scaling of Y and keeps exp/log in a safe range.
    """
    h_bar = n_keep_max
    tail = s[h_bar:]
    lower = max(s[h_bar] ** 2 / (M * x_bar), float(np.sum(tail**2)) / (M * (L - h_bar)))
    lower = min(max(lower, _SIGMA2_REL_FLOOR), 1.0)
    lo, hi = math.log(lower), 0.0
    if hi - lo <= 1e-12:
        return lower
    s2_top = s[:h_bar] ** 2
    tail_s2 = float(np.sum(tail**2))

    grid = np.linspace(lo, hi, _GRID_POINTS)
    values = _free_energy(grid, s2_top, tail_s2, L, M, alpha, x_bar)
    i = int(np.argmin(values))
    a, b = float(grid[max(i - 1, 0)]), float(grid[min(i + 1, _GRID_POINTS - 1)])
    t_ref = _bisect_slope(lambda t: _free_energy_slope(t, s2_top, tail_s2, L, M, alpha, x_bar), a, b)
    # Keep the refined point unless the bracket held two minima and bisection found the worse.
    f_ref = float(_free_energy(np.array([t_ref]), s2_top, tail_s2, L, M, alpha, x_bar)[0])
    t_best = t_ref if f_ref <= values[i] + 1e-12 * abs(values[i]) else float(grid[i])
    return float(math.exp(t_best))


def _validate_spectrum(s: Any, L: int, M: int) -> np.ndarray:
    """Checks ``s`` against the matrix shape; returns it as float64, sorted descending."""
    for name, v in (("L", L), ("M", M)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"evbmf: {name} must be a positive int, got {v!r}")
    if L * M < 2:
        raise ValueError(f"evbmf: matrix must be at least 1x2, got {L}x{M}")
    s = np.asarray(s, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"evbmf: singular values must be 1-D, got shape {s.shape}")
    if s.shape[0] != min(L, M):
        raise ValueError(
            f"evbmf: expected min(L, M) = {min(L, M)} singular values for a "
            f"{L}x{M} matrix, got {s.shape[0]} (the full spectrum is needed)"
        )
    if not np.all(np.isfinite(s)):
        raise ValueError("evbmf: singular values contain NaN or Inf")
    if np.any(s < 0):
        raise ValueError(f"evbmf: singular values must be >= 0, got min {s.min()}")
    return np.sort(s)[::-1]


def evbmf_rank_from_singular_values(s: np.ndarray, L: int, M: int) -> EVBMFResult:
    """EVBMF analysis, with the noise variance estimated, from the full singular spectrum of an
    ``L x M`` matrix.

    Args:
        s: shape ``(min(L, M),)``, all singular values of the matrix (any order, >= 0).
        L, M: matrix shape; the order does not matter (the paper's ``L <= M`` is enforced here).

    Returns:
        EVBMFResult; ``rank == 0`` when nothing is distinguishable from noise (including an
        all-zero matrix, for which ``sigma2 == threshold == 0``).

    Raises:
        ValueError: on a malformed spectrum or shape.
    """
    s = _validate_spectrum(s, L, M)
    L, M = min(L, M), max(L, M)
    alpha = L / M
    tau_bar = _tau_bar(alpha)
    x_bar = (1.0 + tau_bar) * (1.0 + alpha / tau_bar)

    # Work in units where sigma2_upper == 1: scale equivariance up to round-off, no overflow.
    scale = float(s[0] * math.sqrt(np.sum((s / s[0]) ** 2) / (L * M))) if s[0] > 0 else 0.0
    if scale == 0.0:
        return EVBMFResult(0, 0.0, _frozen(np.zeros(0)), 0.0)
    scale2 = scale * scale
    s_n = s / scale

    # EVB with estimated noise can never keep more than H_bar components (JMLR 2013).
    h_bar = math.ceil(L / (1.0 + alpha)) - 1
    # with nothing keepable, F is minimised at the ML noise variance (the upper bound, 1 here)
    sig2_n = _estimate_sigma2(s_n, L, M, alpha, x_bar, h_bar) if h_bar > 0 else 1.0
    thr_n = math.sqrt(M * sig2_n * x_bar)
    rank = min(int(np.count_nonzero(s_n > thr_n)), max(h_bar, 0))
    kept = s_n[:rank]
    x = kept**2 / (M * sig2_n)
    shrunk = kept * _tau(x, alpha) / x * scale if rank else np.zeros(0)
    return EVBMFResult(rank, sig2_n * scale2, _frozen(shrunk), thr_n * scale)


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.float64)
    a.setflags(write=False)
    return a
