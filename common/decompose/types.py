"""Types the decomposition modules share without importing each other.

:class:`Spectra` is what the spectrum-reading rank rules of :mod:`common.decompose.ranks`
(:func:`~common.decompose.ranks.energy_ranks`, :func:`~common.decompose.ranks.evbmf_ranks`) read of a
kernel's spectra; :class:`common.decompose.ht.KernelSpectra` is one. :mod:`common.decompose.ht` imports
:mod:`common.decompose.ranks` (to validate ranks), so the rules name this protocol, not that class.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Spectra(Protocol):
    """A kernel's spectra as the rank rules read them (:class:`common.decompose.ht.KernelSpectra`).

    Attributes:
        name: layer name used in messages.
        kernel_shape: ``(T, C, kh, kw)`` of one group's kernel.
    """

    name: str
    kernel_shape: tuple[int, int, int, int]

    @property
    def s1(self) -> torch.Tensor:
        """Singular values of the C-mode unfolding, (G, C), descending."""
        ...

    @property
    def s3(self) -> torch.Tensor:
        """Singular values of the T-mode unfolding, (G, T), descending."""
        ...

    def core_spectrum(self, r1: int, r3: int) -> torch.Tensor:
        """Singular values of the HT-2 core matrix for (R1, R3): (G, min(R1*kh, R3*kw)), descending."""
        ...
