"""Hierarchical Tucker-2 (HT-2), Tucker-2 and SVD decompositions of conv kernels (pure tensor code).

HT-2 follows Gabor & Zdunek, "Compressing convolutional neural networks with hierarchical Tucker-2
decomposition", Applied Soft Computing 132 (2023). A kernel ``W`` of shape ``(T, C, kh, kw)`` is
split along the balanced dimension tree ``{C, kh} | {T, kw}``:

- leaf bases ``U1`` (C×R1) and ``U3`` (T×R3): leading left singular vectors of the C- and T-mode
  unfoldings of ``W``;
- the projected core ``W ×_C U1ᵀ ×_T U3ᵀ``, arranged as the ``(R1·kh) × (R3·kw)`` matrix ``M``, is
  split by a rank-R13 truncated SVD ``M ≈ A B`` into ``G1 = A`` reshaped ``(R1, kh, R13)`` and
  ``G2 = B`` reshaped ``(R13, R3, kw)``, so that

  ``W[t, c, i, j] ≈ Σ_{a, b, r} U3[t, b] U1[c, a] G1[a, i, r] G2[r, b, j]``.

Tucker-2 is Kim et al., "Compression of deep convolutional neural networks for fast and low power
mobile applications", ICLR 2016 (truncated HOSVD on the C and T modes). The SVD baseline is a
rank-R factorization of a 1×1 kernel.

Every decomposition handles grouped convolutions by decomposing each group's kernel
``(T/G, C/G, kh, kw)`` with the same ranks; all factors carry a leading group axis ``G``.

The expensive part (leaf spectra and the fully rotated core) is computed once per kernel by
:class:`KernelSpectra`; factors for any new ranks then only slice and, for HT-2, eigendecompose the
small Gram matrix of ``M`` (cached per ``(R1, R3)``), which is what makes a rank search over hundreds
of plans cheap.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from common.decompose.ranks import validate_ranks

Tensor = torch.Tensor

# Above this size the per-plan Gram eigendecomposition of the HT-2 core runs in float32: the kept
# leading eigenpairs are well conditioned, and float64 would cost ~2x on the search's hot path.
_FLOAT64_GRAM_MAX = 256
_CORE_CACHE_SIZE = 16


def _sym_eig_desc(gram: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenpairs of a symmetric PSD matrix in descending order, eigenvalues clipped at 0."""
    vals, vecs = torch.linalg.eigh(gram)
    return vals.flip(-1).clamp_min(0), vecs.flip(-1)


def _spectral_norm(m: Tensor) -> Tensor:
    """Largest singular value of each matrix in a batch ``(G, p, q)``, via the smaller Gram matrix."""
    g = m.transpose(1, 2) @ m if m.shape[2] <= m.shape[1] else m @ m.transpose(1, 2)
    return torch.linalg.eigvalsh(g)[:, -1].clamp_min(0).sqrt()


def _check_kernel(weight: Tensor, groups: int, name: str) -> Tensor:
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        raise ValueError(
            f"layer {name!r}: expected a 4-D conv kernel (T, C, kh, kw), got "
            f"{type(weight).__name__} of shape {tuple(getattr(weight, 'shape', ()))}"
        )
    if groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"layer {name!r}: {weight.shape[0]} output channels do not split into {groups} groups")
    weight = weight.detach()
    if not torch.isfinite(weight).all():
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(f"layer {name!r}: kernel has {bad} non-finite (NaN/inf) values; refusing to decompose")
    return weight.detach().to("cpu", torch.float64)


@dataclass(frozen=True)
class HT2Factors:
    """HT-2 factors of a (possibly grouped) kernel. Shapes: ``u1`` (G, C, R1), ``g1`` (G, R1, kh, R13),
    ``g2`` (G, R13, R3, kw), ``u3`` (G, T, R3); ``ranks`` = (R1, R3, R13); C and T are per group."""

    u1: Tensor
    g1: Tensor
    g2: Tensor
    u3: Tensor
    ranks: tuple[int, int, int]
    relative_error: float

    def reconstruct(self) -> Tensor:
        """The approximated kernel, shape ``(G*T, C, kh, kw)``."""
        w = torch.einsum("gca,gair,grbj,gtb->gtcij", self.u1, self.g1, self.g2, self.u3)
        return w.reshape(-1, *w.shape[2:])


@dataclass(frozen=True)
class Tucker2Factors:
    """Tucker-2 factors: ``u1`` (G, C, R1), ``core`` (G, R3, R1, kh, kw), ``u3`` (G, T, R3)."""

    u1: Tensor
    core: Tensor
    u3: Tensor
    ranks: tuple[int, int]
    relative_error: float

    def reconstruct(self) -> Tensor:
        """The approximated kernel, shape ``(G*T, C, kh, kw)``."""
        w = torch.einsum("gca,gbaij,gtb->gtcij", self.u1, self.core, self.u3)
        return w.reshape(-1, *w.shape[2:])


@dataclass(frozen=True)
class SVDFactors:
    """Rank-R factors of a 1×1 kernel: ``first`` (G, R, C) then ``second`` (G, T, R)."""

    first: Tensor
    second: Tensor
    ranks: tuple[int]
    relative_error: float

    def reconstruct(self) -> Tensor:
        """The approximated kernel, shape ``(G*T, C, 1, 1)``."""
        w = torch.einsum("gtr,grc->gtc", self.second, self.first)
        return w.reshape(-1, w.shape[-1], 1, 1)


class KernelSpectra:
    """Once-per-kernel spectra from which factors for any ranks are produced cheaply.

    Holds, per group, the full leaf bases ``U1`` (C×C) and ``U3`` (T×T) with their singular values,
    and the fully rotated core ``K[a, i, b, j] = Σ U1[c, a] U3[t, b] W[t, c, i, j]`` (float64), so that
    the core for ranks (R1, R3) is the slice ``K[:R1, :, :R3, :]``.

    Args:
        weight: kernel ``(G*T, C, kh, kw)``; must be finite.
        groups: number of conv groups G.
        name: layer name used in error messages.
    """

    def __init__(self, weight: Tensor, groups: int = 1, name: str = "<layer>"):
        w = _check_kernel(weight, groups, name)
        self.name = name
        self.groups = groups
        gt, c, kh, kw = w.shape
        t = gt // groups
        self.kernel_shape = (t, c, kh, kw)
        wg = w.reshape(groups, t, c, kh, kw)
        self.norm_sq = float(wg.pow(2).sum())
        w32 = wg.float()
        w_c = w32.permute(0, 2, 1, 3, 4).reshape(groups, c, -1)
        w_t = w32.reshape(groups, t, -1)
        # Gram route: the unfoldings are wide (C × T·kh·kw), so C×C and T×T eigenproblems are far
        # cheaper than SVDs of the unfoldings. The big products run in float32 (their rounding,
        # ~1e-7·σ1², is far below any truncation we make); the eigensolves run in float64 so the
        # bases are orthonormal to double precision, which keeps full-rank factors exact.
        self.s1_sq, self.u1 = _sym_eig_desc((w_c @ w_c.transpose(1, 2)).double())
        self.s3_sq, self.u3 = _sym_eig_desc((w_t @ w_t.transpose(1, 2)).double())
        # Fully rotated core K[a, i, b, j], built with two matmuls (a 3-operand einsum is far slower).
        k = self.u1.float().transpose(1, 2) @ w_c  # (G, A, T·kh·kw)
        k = k.reshape(groups, c, t, kh * kw).transpose(1, 2).reshape(groups, t, -1)
        k = self.u3.float().transpose(1, 2) @ k  # (G, B, A·kh·kw)
        self._core32 = k.reshape(groups, t, c, kh, kw).permute(0, 2, 3, 1, 4).contiguous()
        self.core = self._core32.double()
        # HT-2/Tucker-2 residuals are measured against the core's own energy, not ‖W‖²: both then
        # carry the same float32 rounding, which cancels (else full ranks report ~sqrt(1e-7) error).
        self._core_sq = float(self.core.pow(2).sum())
        self._weight = wg
        self._gram_cache: OrderedDict[tuple[int, int], tuple[Tensor, Tensor, str]] = OrderedDict()

    @property
    def s1(self) -> Tensor:
        """Singular values of the C-mode unfolding, (G, C), descending."""
        return self.s1_sq.sqrt()

    @property
    def s3(self) -> Tensor:
        """Singular values of the T-mode unfolding, (G, T), descending."""
        return self.s3_sq.sqrt()

    def core_matrix(self, r1: int, r3: int, dtype: torch.dtype = torch.float64) -> Tensor:
        """The projected HT-2 core arranged as ``(G, R1*kh, R3*kw)``, float64 or float32."""
        _, _, kh, kw = self.kernel_shape
        core = self._core32 if dtype == torch.float32 else self.core
        return core[:, :r1, :, :r3, :].reshape(self.groups, r1 * kh, r3 * kw)

    def _core_gram_eig(self, r1: int, r3: int) -> tuple[Tensor, Tensor, str]:
        """Eigenpairs of the smaller Gram matrix of the core for (R1, R3), LRU-cached."""
        key = (r1, r3)
        hit = self._gram_cache.get(key)
        if hit is not None:
            self._gram_cache.move_to_end(key)
            return hit
        _, _, kh, kw = self.kernel_shape
        big = min(r1 * kh, r3 * kw) > _FLOAT64_GRAM_MAX
        m = self.core_matrix(r1, r3, torch.float32 if big else torch.float64)
        side = "cols" if m.shape[2] <= m.shape[1] else "rows"
        gram = m.transpose(1, 2) @ m if side == "cols" else m @ m.transpose(1, 2)
        vals, vecs = _sym_eig_desc(gram)
        out = (vals, vecs, side)
        self._gram_cache[key] = out
        if len(self._gram_cache) > _CORE_CACHE_SIZE:
            self._gram_cache.popitem(last=False)
        return out

    def core_spectrum(self, r1: int, r3: int) -> Tensor:
        """Singular values of the HT-2 core matrix for (R1, R3): (G, min(R1*kh, R3*kw)), descending."""
        vals, _, _ = self._core_gram_eig(r1, r3)
        return vals.double().sqrt()

    def ht2(self, ranks: Sequence[int]) -> HT2Factors:
        """HT-2 factors at ``ranks`` = (R1, R3, R13); validated."""
        t, c, kh, kw = self.kernel_shape
        r1, r3, r13 = validate_ranks("ht2", self.kernel_shape, ranks, self.name)
        rows, cols = r1 * kh, r3 * kw
        eig = None if r13 in (rows, cols) else self._core_gram_eig(r1, r3)
        # A truncation works in the Gram's dtype: above _FLOAT64_GRAM_MAX its eigenvectors carry
        # float32 accuracy, so float64 products would only cost time.
        m = self.core_matrix(r1, r3, torch.float64 if eig is None else eig[1].dtype)
        if r13 == cols:  # no truncation: M = M · I
            a, b = m, torch.eye(cols, dtype=m.dtype).expand(self.groups, cols, cols)
            kept = m.pow(2).sum()
            sa, sb = _spectral_norm(a), _spectral_norm(b)
        elif r13 == rows:
            a, b = torch.eye(rows, dtype=m.dtype).expand(self.groups, rows, rows), m
            kept = m.pow(2).sum()
            sa, sb = _spectral_norm(a), _spectral_norm(b)
        else:
            vals, vecs, side = eig
            v = vecs[:, :, :r13]
            # Split the singular values evenly (A = U·S^½, B = S^½·Vᵀ): unbalanced factors make
            # SGD finetuning of the chained convs unstable.
            sv = vals[:, :r13].sqrt().clamp_min(1e-12 * float(vals[:, :1].sqrt().max().clamp_min(1e-300)))
            root = sv.sqrt()
            if side == "cols":
                a, b = (m @ v) / root[:, None, :], root[:, :, None] * v.transpose(1, 2)
            else:
                a, b = v * root[:, None, :], (v.transpose(1, 2) @ m) / root[:, :, None]
            kept = vals[:, :r13].double().sum()
            sa = sb = root[:, 0]  # ‖U·S^½‖₂ = ‖S^½·Vᵀ‖₂ = √σ₁, known from the eigenvalues
        # Balance the chain: give all four factors the same spectral norm t (their product is
        # unchanged). With orthonormal leaves and the whole scale in the core, the leaves' gradients
        # are scaled by ‖W‖², which makes SGD finetuning diverge at ordinary learning rates.
        t = (sa * sb).clamp_min(1e-30) ** 0.25
        a = a * (t / sa.clamp_min(1e-30))[:, None, None]
        b = b * (t / sb.clamp_min(1e-30))[:, None, None]
        g1 = a.reshape(self.groups, r1, kh, r13).double()
        g2 = b.reshape(self.groups, r13, r3, kw).double()
        err = self._relative_error(float(kept), self._core_sq)
        return HT2Factors(
            self.u1[:, :, :r1] * t[:, None, None], g1, g2, self.u3[:, :, :r3] * t[:, None, None], (r1, r3, r13), err
        )

    def tucker2(self, ranks: Sequence[int]) -> Tucker2Factors:
        """Tucker-2 (truncated HOSVD) factors at ``ranks`` = (R1, R3); validated."""
        r1, r3 = validate_ranks("tucker2", self.kernel_shape, ranks, self.name)
        core = self.core[:, :r1, :, :r3, :].permute(0, 3, 1, 2, 4)  # (G, R3, R1, kh, kw)
        err = self._relative_error(float(core.pow(2).sum()), self._core_sq)
        # Same balancing as HT-2: the three factors get equal spectral norms.
        sc = _spectral_norm(core.reshape(self.groups, r3, -1))
        t = sc.clamp_min(1e-30) ** (1.0 / 3.0)
        core = core * (t / sc.clamp_min(1e-30)).view(-1, 1, 1, 1, 1)
        return Tucker2Factors(
            self.u1[:, :, :r1] * t[:, None, None],
            core.contiguous(),
            self.u3[:, :, :r3] * t[:, None, None],
            (r1, r3),
            err,
        )

    def svd(self, ranks: Sequence[int]) -> SVDFactors:
        """Optimal rank-R factors of a 1×1 kernel, ``ranks`` = (R,); validated."""
        (r,) = validate_ranks("svd", self.kernel_shape, ranks, self.name)
        u = self.u3[:, :, :r]  # (G, T, R)
        first = u.transpose(1, 2) @ self._weight[..., 0, 0]  # (G, R, C)
        # ‖UᵣᵀW‖² in float64 rather than the float32-Gram eigenvalues, for the same reason as above.
        err = self._relative_error(float(first.pow(2).sum()), self.norm_sq)
        t = _spectral_norm(first).clamp_min(1e-30).sqrt()  # balance the two factors
        return SVDFactors(first / t[:, None, None], (u * t[:, None, None]).contiguous(), (r,), err)

    def decompose(self, method: str, ranks: Sequence[int]):
        """Dispatch to :meth:`ht2`, :meth:`tucker2` or :meth:`svd`."""
        if method == "ht2":
            return self.ht2(ranks)
        if method == "tucker2":
            return self.tucker2(ranks)
        if method == "svd":
            return self.svd(ranks)
        raise ValueError(f"layer {self.name!r}: cannot decompose with method {method!r}")

    def _relative_error(self, kept_energy: float, total_energy: float) -> float:
        # The factors are orthogonal projections followed by an optimal truncation, so the residual
        # energy is the total minus what the kept components carry (no reconstruction needed).
        if self.norm_sq == 0.0:
            return 0.0
        return math.sqrt(max(total_energy - kept_energy, 0.0) / self.norm_sq)
