"""Tests for common.decompose.ranks and common.decompose.ht: HT-2 / Tucker-2 / SVD kernel decompositions.

Oracles: exactness at full rank, an independent numpy implementation of HT-2 from its definition
(Gabor & Zdunek 2023), tensorly's HOSVD building blocks and its HOOI ``partial_tucker`` for Tucker-2,
and the direct residual ``‖W − reconstruct‖ / ‖W‖`` for the errors the factors report.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.decompose.ht import HT2Factors, KernelSpectra
from common.decompose.ranks import (
    RANK_NAMES,
    energy_rank,
    energy_ranks,
    evbmf_ranks,
    full_ranks,
    rank_bounds,
    ranks_from_level,
    resolve_ranks,
    round_rank,
    rounded_ranks,
    validate_ranks,
)

PROFILE = settings.get_profile("ht2-tests")
pytestmark = pytest.mark.one_thread


@st.composite
def kernels(draw, max_c: int = 7, max_t: int = 7, max_k: int = 5):
    """(weight (G*T, C, kh, kw) float32, groups): a seeded random kernel, grouped or not."""
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    t = draw(st.integers(1, max_t))
    c = draw(st.integers(1, max_c))
    kh = draw(st.integers(1, max_k))
    kw = draw(st.integers(1, max_k))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(groups * t, c, kh, kw, generator=g), groups


def _direct_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    w = weight.double()
    return float((w - approx.double()).norm() / w.norm())


def _group_shape(weight: torch.Tensor, groups: int) -> tuple[int, int, int, int]:
    t, c, kh, kw = weight.shape
    return (t // groups, c, kh, kw)


# ----------------------------------------------------------------------------------------------
# ranks.py
# ----------------------------------------------------------------------------------------------


def test_full_ranks_and_bounds():
    assert full_ranks("ht2", (64, 32, 3, 3)) == (32, 64, 96)
    assert full_ranks("ht2", (8, 32, 5, 1)) == (32, 8, 8)
    assert full_ranks("tucker2", (64, 32, 3, 3)) == (32, 64)
    assert full_ranks("svd", (64, 32, 1, 1)) == (32,)
    assert full_ranks("dense", (64, 32, 3, 3)) == ()
    # R13's bound follows the chosen R1 and R3
    assert rank_bounds("ht2", (64, 32, 3, 3), (4, 10, 1)) == [(1, 32), (1, 64), (1, 12)]
    assert rank_bounds("ht2", (64, 32, 3, 3)) == [(1, 32), (1, 64), (1, 96)]
    with pytest.raises(ValueError, match="1x1"):
        rank_bounds("svd", (8, 8, 3, 3))
    for fn in (full_ranks, rank_bounds):
        with pytest.raises(ValueError, match="cp"):
            fn("cp", (8, 8, 3, 3))


def test_round_rank():
    assert round_rank(0.2, 64, 8) == 8  # never below 1, rounded up to the multiple
    assert round_rank(17, 64, 8) == 24
    assert round_rank(63.5, 64, 8) == 64  # capped at full
    assert round_rank(5.2, 12, 8) == 6  # narrow mode: exact ceiling, no multiple
    assert round_rank(5.0, 64, 1) == 5
    assert round_rank(5.0000000001, 64, 1) == 5  # float noise does not bump a rank


def test_rounded_ranks_assembles_every_method_in_rank_name_order():
    calls = []

    def raw(name, full, done):
        calls.append((name, full, done))
        return {"R1": 10.2, "R3": 70.0, "R13": 5.0, "R": 2.5}[name]

    assert rounded_ranks("ht2", (64, 32, 3, 3), raw, multiple=8) == (16, 64, 8)
    # R13 is asked for last, capped by the rounded R1 and R3: min(16*3, 64*3)
    assert calls == [("R1", 32, ()), ("R3", 64, (16,)), ("R13", 48, (16, 64))]
    calls.clear()
    assert rounded_ranks("tucker2", (64, 32, 3, 3), raw) == (11, 64)
    assert [c[0] for c in calls] == ["R1", "R3"]
    calls.clear()
    assert rounded_ranks("svd", (20, 8, 1, 1), raw) == (3,) and calls == [("R", 8, ())]
    assert rounded_ranks("dense", (20, 8, 1, 1), raw) == ()
    for method in RANK_NAMES:
        names = []
        rounded_ranks(method, (20, 8, 1, 1), lambda n, f, d, names=names: names.append(n) or 1.0)
        assert tuple(names) == RANK_NAMES[method]
    with pytest.raises(ValueError, match="cp"):
        rounded_ranks("cp", (20, 8, 1, 1), raw)


def _low_rank_kernel(t, c, k, r, noise, seed):
    """A kernel whose C- and T-mode unfoldings have rank ``r`` (plus i.i.d. noise)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.einsum(
        "ta,abij,cb->tcij",
        torch.randn(t, r, generator=g),
        torch.randn(r, r, k, k, generator=g),
        torch.randn(c, r, generator=g),
    )
    return w / w.norm() + noise * torch.randn(w.shape, generator=g)


def test_energy_ranks_from_the_spectra():
    g = torch.Generator().manual_seed(2)
    sp = KernelSpectra(torch.randn(12, 10, 3, 3, generator=g))
    for method in ("ht2", "tucker2"):
        assert energy_ranks(sp, method, 1.0) == full_ranks(method, sp.kernel_shape)  # a generic kernel
        ranks = [energy_ranks(sp, method, e) for e in (0.2, 0.5, 0.8, 0.95)]
        assert all(all(a <= b for a, b in zip(lo, hi)) for lo, hi in zip(ranks, ranks[1:])), ranks
        assert validate_ranks(method, sp.kernel_shape, ranks[1]) == ranks[1]
    r1, r3, r13 = energy_ranks(sp, "ht2", 0.6)
    assert (r1, r3) == (energy_rank(sp.s1, 0.6), energy_rank(sp.s3, 0.6))
    assert r13 == energy_rank(sp.core_spectrum(r1, r3), 0.6)  # R13 from the core at those R1, R3
    low = KernelSpectra(_low_rank_kernel(16, 12, 3, 2, 0.0, 0))
    assert energy_ranks(low, "tucker2", 0.999999) == (2, 2)
    assert energy_ranks(low, "tucker2", 0.999999, multiple=8) == (2, 8)  # C=12 stays exact, T=16 rounds
    one = KernelSpectra(torch.randn(20, 8, 1, 1, generator=g))
    assert energy_ranks(one, "svd", 1.0) == (8,)


def test_evbmf_ranks_find_the_signal_rank_and_fall_back_to_one():
    sp = KernelSpectra(_low_rank_kernel(48, 40, 3, 4, 1e-3, 1), name="blocks.2")
    assert evbmf_ranks(sp, "tucker2") == ((4, 4), ())
    (r1, r3, r13), rank0 = evbmf_ranks(sp, "ht2")
    # EVBMF keeps nothing of the small (12 x 16) HT-2 core at (4, 4) here, so R13 falls back to 1.
    assert (r1, r3, r13) == (4, 4, 1) and rank0 == ("the HT-2 core",)
    # Rank 0 falls back to rank 1 silently here: the matrices are returned for the caller to report.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ranks, rank0 = evbmf_ranks(KernelSpectra(torch.zeros(6, 5, 3, 3), name="z"), "ht2")
    assert ranks == (1, 1, 1)
    assert rank0 == ("the C-mode unfolding", "the T-mode unfolding", "the HT-2 core")
    assert evbmf_ranks(KernelSpectra(torch.zeros(6, 5, 1, 1), name="z"), "svd") == ((1,), ("the 1x1 kernel",))


@settings(PROFILE, max_examples=60)
@given(
    t=st.integers(1, 600),
    c=st.integers(1, 600),
    kh=st.integers(1, 7),
    kw=st.integers(1, 7),
    lv=st.lists(st.floats(0.01, 1.0), min_size=2, max_size=2),
    multiple=st.sampled_from([1, 8]),
)
def test_ranks_from_level_monotone_and_valid(t, c, kh, kw, lv, multiple):
    lo, hi = sorted(lv)
    shape = (t, c, kh, kw)
    for method in ("ht2", "tucker2") + (("svd",) if kh * kw == 1 else ()):
        a = ranks_from_level(method, shape, lo, multiple)
        b = ranks_from_level(method, shape, hi, multiple)
        assert validate_ranks(method, shape, a) == a and validate_ranks(method, shape, b) == b
        assert all(x <= y for x, y in zip(a, b)), (method, a, b)
        assert ranks_from_level(method, shape, 1.0, multiple) == full_ranks(method, shape)


def test_resolve_ranks_specs():
    shape = (16, 8, 3, 3)
    assert resolve_ranks("ht2", shape, 4) == (4, 4, 4)
    assert resolve_ranks("ht2", shape, (8, 16, 24)) == (8, 16, 24)
    assert resolve_ranks("ht2", shape, 1.0) == full_ranks("ht2", shape)
    assert resolve_ranks("tucker2", shape, [3, 5]) == (3, 5)
    assert resolve_ranks("dense", shape, 0.3) == ()
    for bad, what in ((True, "invalid rank"), ("8", "rank must be"), (1.5, r"\(0, 1\]"), (0.0, r"\(0, 1\]")):
        with pytest.raises(ValueError, match=what) as e:
            resolve_ranks("ht2", shape, bad, layer="conv_x")
        assert "conv_x" in str(e.value)


@pytest.mark.parametrize(
    "method,shape,ranks,name,lo,hi",
    [
        ("ht2", (16, 8, 3, 3), (0, 4, 4), "R1", 1, 8),
        ("ht2", (16, 8, 3, 3), (9, 4, 4), "R1", 1, 8),
        ("ht2", (16, 8, 3, 3), (8, 17, 4), "R3", 1, 16),
        ("ht2", (16, 8, 3, 3), (2, 5, 7), "R13", 1, 6),  # min(R1*kh, R3*kw) = min(6, 15)
        ("ht2", (16, 8, 3, 3), (2, 5, 0), "R13", 1, 6),
        ("tucker2", (16, 8, 3, 3), (4, 17), "R3", 1, 16),
        ("svd", (16, 8, 1, 1), (9,), "R", 1, 8),
    ],
)
def test_ranks_out_of_range_name_layer_rank_and_range(method, shape, ranks, name, lo, hi):
    w = torch.randn(*shape)
    with pytest.raises(ValueError) as e:
        KernelSpectra(w, name="features.7").decompose(method, ranks)
    msg = str(e.value)
    assert "features.7" in msg and f"{name}=" in msg and f"[{lo}, {hi}]" in msg, msg


def test_rank_count_and_type_errors():
    sp = KernelSpectra(torch.randn(6, 4, 3, 3), name="layer3.1.conv2")
    with pytest.raises(ValueError, match="layer3.1.conv2.*takes 3 ranks"):
        sp.ht2((2, 2))
    with pytest.raises(ValueError, match="layer3.1.conv2.*integers"):
        sp.ht2((2, 2.5, 2))
    with pytest.raises(ValueError, match="layer3.1.conv2.*1x1"):
        sp.svd((2,))
    with pytest.raises(ValueError, match="layer3.1.conv2.*cp"):
        sp.decompose("cp", (2,))


# ----------------------------------------------------------------------------------------------
# ht.py: bad kernels
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_kernel_raises_naming_layer(bad):
    w = torch.randn(4, 4, 3, 3)
    w[1, 2, 0, 1] = bad
    with pytest.raises(ValueError, match=r"blocks\.3\.conv.*non-finite"):
        KernelSpectra(w, name="blocks.3.conv")


def test_malformed_kernels():
    with pytest.raises(ValueError, match="'lin'.*4-D"):
        KernelSpectra(torch.randn(4, 4), name="lin")
    with pytest.raises(ValueError, match="'g'.*groups"):
        KernelSpectra(torch.randn(6, 2, 3, 3), groups=4, name="g")
    with pytest.raises(ValueError, match="'g'.*groups"):
        KernelSpectra(torch.randn(6, 2, 3, 3), groups=0, name="g")


def test_zero_kernel_has_zero_error():
    f = KernelSpectra(torch.zeros(4, 3, 3, 3)).ht2((1, 1, 1))
    assert f.relative_error == 0.0 and not f.reconstruct().abs().any()


# ----------------------------------------------------------------------------------------------
# ht.py: properties
# ----------------------------------------------------------------------------------------------


@settings(PROFILE)
@given(kernels())
def test_full_rank_is_exact(kg):
    w, groups = kg
    sp = KernelSpectra(w, groups)
    shape = _group_shape(w, groups)
    methods = ["ht2", "tucker2"] + (["svd"] if w.shape[2] * w.shape[3] == 1 else [])
    for method in methods:
        f = sp.decompose(method, full_ranks(method, shape))
        assert f.reconstruct().shape == w.shape
        assert _direct_error(w, f.reconstruct()) <= 1e-6, method
        assert f.relative_error <= 1e-6, method


@settings(PROFILE)
@given(kernels(), st.data())
def test_reported_error_equals_direct_error(kg, data):
    w, groups = kg
    sp = KernelSpectra(w, groups)
    shape = _group_shape(w, groups)
    t, c, kh, kw = shape
    r1, r3 = data.draw(st.integers(1, c)), data.draw(st.integers(1, t))
    r13 = data.draw(st.integers(1, min(r1 * kh, r3 * kw)))
    for f in (sp.ht2((r1, r3, r13)), sp.tucker2((r1, r3))) + ((sp.svd((min(r1, r3),)),) if kh * kw == 1 else ()):
        assert f.relative_error == pytest.approx(_direct_error(w, f.reconstruct()), abs=1e-6)


def _errors_along(sp: KernelSpectra, w: torch.Tensor, method: str, base: tuple[int, ...], axis: int):
    """(reported, direct) errors as rank ``axis`` grows from ``base[axis]`` to its upper bound."""
    shape = sp.kernel_shape
    rep, direct = [], []
    ranks = list(base)
    hi = rank_bounds(method, shape, ranks)[axis][1]
    for v in range(base[axis], hi + 1):
        ranks[axis] = v
        f = sp.decompose(method, tuple(ranks))
        rep.append(f.relative_error)
        direct.append(_direct_error(w, f.reconstruct()))
    return rep, direct


@settings(PROFILE)
@given(kernels(), st.data())
def test_error_never_increases_with_any_single_rank(kg, data):
    w, groups = kg
    sp = KernelSpectra(w, groups)
    t, c, kh, kw = sp.kernel_shape
    r1, r3 = data.draw(st.integers(1, c)), data.draw(st.integers(1, t))
    r13 = data.draw(st.integers(1, min(r1 * kh, r3 * kw)))
    cases = [("ht2", (r1, r3, r13), ax) for ax in range(3)] + [("tucker2", (r1, r3), ax) for ax in range(2)]
    if kh * kw == 1:
        cases.append(("svd", (min(r1, r3),), 0))
    for method, base, axis in cases:
        rep, direct = _errors_along(sp, w, method, base, axis)
        name = RANK_NAMES[method][axis]
        for seq in (rep, direct):
            steps = np.diff(seq)
            assert (steps <= 1e-6).all(), f"{method} error rises with {name} from {base}: {seq}"


@settings(PROFILE)
@given(kernels(max_c=4, max_t=4), st.data())
def test_groups_decompose_independently(kg, data):
    w, groups = kg
    sp = KernelSpectra(w, groups)
    t, c, kh, kw = sp.kernel_shape
    r1, r3 = data.draw(st.integers(1, c)), data.draw(st.integers(1, t))
    r13 = data.draw(st.integers(1, min(r1 * kh, r3 * kw)))
    f = sp.ht2((r1, r3, r13))
    assert f.u1.shape == (groups, c, r1) and f.g1.shape == (groups, r1, kh, r13)
    assert f.g2.shape == (groups, r13, r3, kw) and f.u3.shape == (groups, t, r3)
    per_group = [KernelSpectra(wg).ht2((r1, r3, r13)).reconstruct() for wg in w.split(t)]
    torch.testing.assert_close(f.reconstruct(), torch.cat(per_group), atol=1e-5, rtol=1e-5)
    tk = sp.tucker2((r1, r3)).reconstruct()
    torch.testing.assert_close(
        tk, torch.cat([KernelSpectra(wg).tucker2((r1, r3)).reconstruct() for wg in w.split(t)]), atol=1e-5, rtol=1e-5
    )


@settings(PROFILE)
@given(kernels(max_c=6, max_t=6), st.data())
def test_factor_structure(kg, data):
    """Leaves are orthogonal with equal column norms, the chain is balanced (every factor has the
    same spectral norm, for stable finetuning), and the HT-2 factors contract as documented."""
    w, groups = kg
    sp = KernelSpectra(w, groups)
    t, c, kh, kw = sp.kernel_shape
    r1, r3 = data.draw(st.integers(1, c)), data.draw(st.integers(1, t))
    r13 = data.draw(st.integers(1, min(r1 * kh, r3 * kw)))  # the top value takes the no-truncation path
    f = sp.ht2((r1, r3, r13))
    tk = sp.tucker2((r1, r3))
    for g in range(groups):
        for u in (f.u1[g], f.u3[g], tk.u1[g], tk.u3[g]):
            gram = u.T @ u
            torch.testing.assert_close(gram, gram[0, 0] * torch.eye(u.shape[1], dtype=u.dtype), atol=1e-9, rtol=1e-9)
        ht_norms = [
            torch.linalg.matrix_norm(x, ord=2)
            for x in (f.u1[g], f.g1[g].reshape(r1 * kh, r13), f.g2[g].reshape(r13, r3 * kw), f.u3[g])
        ]
        tk_norms = [torch.linalg.matrix_norm(x, ord=2) for x in (tk.u1[g], tk.core[g].reshape(r3, -1), tk.u3[g])]
        for norms in (ht_norms, tk_norms):
            norms = torch.stack(norms)
            assert float(norms.max() - norms.min()) <= 1e-6 * float(norms.max()), norms
    w_hat = torch.zeros(groups, t, c, kh, kw, dtype=torch.float64)
    for g in range(groups):
        for r in range(r13):
            left = f.u1[g] @ f.g1[g, :, :, r]  # (C, kh)
            right = torch.einsum("tb,bj->tj", f.u3[g], f.g2[g, r])  # (T, kw)
            w_hat[g] += torch.einsum("ci,tj->tcij", left, right)
    torch.testing.assert_close(f.reconstruct(), w_hat.reshape(w.shape), atol=1e-10, rtol=1e-10)
    # singular values reported by the spectra are those of the unfoldings
    # (squared: the spectra come from Gram matrices, so tiny values are only accurate in square)
    w64 = w.double().reshape(groups, t, c, kh, kw)
    s3 = torch.linalg.svdvals(w64.reshape(groups, t, -1))
    tol = 1e-5 * float(s3.max()) ** 2
    torch.testing.assert_close(sp.s3[:, : s3.shape[1]] ** 2, s3**2, atol=tol, rtol=1e-5)
    s1 = torch.linalg.svdvals(w64.transpose(1, 2).reshape(groups, c, -1))
    torch.testing.assert_close(sp.s1[:, : s1.shape[1]] ** 2, s1**2, atol=tol, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Oracles
# ----------------------------------------------------------------------------------------------


def _numpy_ht2(w: np.ndarray, r1: int, r3: int, r13: int) -> np.ndarray:
    """HT-2 from its definition: leaf SVDs, projected core as (R1·kh)×(R3·kw), truncated SVD."""
    t, c, kh, kw = w.shape
    u1 = np.linalg.svd(w.transpose(1, 0, 2, 3).reshape(c, -1), full_matrices=False)[0][:, :r1]
    u3 = np.linalg.svd(w.reshape(t, -1), full_matrices=False)[0][:, :r3]
    core = np.einsum("tcij,ca,tb->aibj", w, u1, u3)  # (R1, kh, R3, kw)
    m = core.reshape(r1 * kh, r3 * kw)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    m_hat = (u[:, :r13] * s[:r13]) @ vt[:r13]
    return np.einsum("aibj,ca,tb->tcij", m_hat.reshape(r1, kh, r3, kw), u1, u3)


@pytest.mark.parametrize(
    "shape,ranks",
    [
        ((12, 10, 3, 3), (5, 7, 9)),
        ((9, 16, 5, 2), (8, 4, 6)),
        ((20, 6, 1, 7), (5, 12, 4)),
        ((7, 7, 4, 4), (7, 7, 10)),
        ((32, 24, 3, 3), (24, 20, 50)),
    ],
)
def test_ht2_matches_numpy_reference(shape, ranks):
    g = torch.Generator().manual_seed(sum(shape) + sum(ranks))
    w = torch.randn(*shape, generator=g, dtype=torch.float64)
    f = KernelSpectra(w).ht2(ranks)
    ref = _numpy_ht2(w.numpy(), *ranks)
    np.testing.assert_allclose(f.reconstruct().numpy(), ref, atol=1e-5, rtol=1e-5)
    ref_err = np.linalg.norm(w.numpy() - ref) / np.linalg.norm(w.numpy())
    assert f.relative_error == pytest.approx(ref_err, abs=1e-6)


def test_tucker2_matches_tensorly_hosvd_and_hooi():
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import partial_tucker
    from tensorly.tenalg import multi_mode_dot

    tl.set_backend("numpy")
    rng = np.random.default_rng(0)
    # a kernel with decaying spectra, as trained kernels have, so truncation matters
    w = rng.standard_normal((24, 16, 3, 3)) * np.exp(-np.arange(24) / 6)[:, None, None, None]
    w = w * np.exp(-np.arange(16) / 5)[None, :, None, None]
    for r3, r1 in ((12, 8), (6, 10), (20, 4), (24, 16)):
        ours = KernelSpectra(torch.from_numpy(w)).tucker2((r1, r3))
        # HOSVD with tensorly's building blocks: identical to ours up to rounding
        u3 = np.linalg.svd(tl.unfold(w, 0), full_matrices=False)[0][:, :r3]
        u1 = np.linalg.svd(tl.unfold(w, 1), full_matrices=False)[0][:, :r1]
        core = multi_mode_dot(w, [u3.T, u1.T], modes=[0, 1])
        hosvd = multi_mode_dot(core, [u3, u1], modes=[0, 1])
        np.testing.assert_allclose(ours.reconstruct().numpy(), hosvd, atol=1e-6, rtol=1e-6)
        # HOOI (tensorly) refines HOSVD: ours is at most 5 % worse, and never meaningfully better
        (tcore, factors), _ = partial_tucker(w, rank=[r3, r1], modes=[0, 1], init="svd", n_iter_max=100, tol=1e-10)
        hooi = multi_mode_dot(tcore, factors, modes=[0, 1])
        hooi_err = np.linalg.norm(w - hooi) / np.linalg.norm(w)
        ours_err = _direct_error(torch.from_numpy(w), ours.reconstruct())
        assert ours.relative_error == pytest.approx(ours_err, abs=1e-6)
        assert hooi_err - 1e-9 <= ours_err <= 1.05 * hooi_err + 1e-6, (r1, r3, ours_err, hooi_err)


def test_svd_is_optimal_low_rank():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 16, 1, 1, generator=g, dtype=torch.float64)
    m = w[:, :, 0, 0]
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    for r in (1, 5, 16):
        f = KernelSpectra(w).svd((r,))
        best = (u[:, :r] * s[:r]) @ vh[:r]
        torch.testing.assert_close(f.reconstruct()[:, :, 0, 0], best, atol=1e-6, rtol=1e-6)  # float32 Gram
        assert f.first.shape == (1, r, 16) and f.second.shape == (1, 24, r)
        n1, n2 = torch.linalg.matrix_norm(f.first[0], ord=2), torch.linalg.matrix_norm(f.second[0], ord=2)
        assert float(n1) == pytest.approx(float(n2), rel=1e-6)  # balanced factors
        assert f.relative_error == pytest.approx(float(s[r:].pow(2).sum().sqrt() / s.norm()), abs=1e-6)


# ----------------------------------------------------------------------------------------------
# Caching: new ranks come from the once-per-kernel spectra, and agree with fresh decompositions
# ----------------------------------------------------------------------------------------------


def test_cached_spectra_agree_with_fresh_decompositions():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(20, 12, 3, 3, generator=g)
    sp = KernelSpectra(w, name="c")
    plans = [(r1, r3, r13) for r1 in (3, 6, 12) for r3 in (4, 10, 20) for r13 in (1, 5, min(r1 * 3, r3 * 3))]
    first = {p: sp.ht2(p).reconstruct() for p in plans}  # > 16 (R1, R3) keys: LRU evicts and refills
    for p in reversed(plans):
        torch.testing.assert_close(sp.ht2(p).reconstruct(), first[p], atol=0, rtol=0)
        torch.testing.assert_close(first[p], KernelSpectra(w).ht2(p).reconstruct(), atol=1e-6, rtol=1e-6)
    vals = sp.core_spectrum(6, 10)
    assert vals.shape == (1, 18) and (vals[:, :-1] >= vals[:, 1:]).all()
    m = sp.core_matrix(6, 10)
    torch.testing.assert_close(vals, torch.linalg.svdvals(m), atol=1e-6, rtol=1e-6)


def test_large_core_float32_gram_path():
    """min(R1*kh, R3*kw) > 512 takes the float32 Gram route; errors stay accurate and monotone."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(200, 180, 3, 3, generator=g) * torch.linspace(1, 0.05, 200)[:, None, None, None]
    sp = KernelSpectra(w)
    errs = []
    for r13 in (100, 300, 520):
        f = sp.ht2((180, 200, r13))
        assert min(180 * 3, 200 * 3) > 512
        assert f.relative_error == pytest.approx(_direct_error(w, f.reconstruct()), abs=1e-5)
        errs.append(f.relative_error)
    assert errs[0] > errs[1] > errs[2]
    assert _direct_error(w, sp.ht2((180, 200, 540)).reconstruct()) < 1e-6


def test_energy_rank():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert energy_rank(s, 9 / 14) == 1
    assert energy_rank(s, 9 / 14 + 1e-6) == 2
    assert energy_rank(s, 1.0) == 3
    assert energy_rank(torch.stack([s, torch.tensor([1.0, 1.0, 1.0, 1.0])]), 0.7) == 3
    with pytest.raises(ValueError, match="energy"):
        energy_rank(s, 0.0)


def test_factors_reconstruct_shapes_and_types():
    w = torch.randn(8, 2, 3, 5)
    f = KernelSpectra(w, groups=2).ht2((2, 3, 4))
    assert isinstance(f, HT2Factors) and f.ranks == (2, 3, 4)
    assert f.reconstruct().shape == (8, 2, 3, 5) and f.reconstruct().dtype == torch.float64
    assert not math.isnan(f.relative_error)
