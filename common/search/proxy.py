"""Candidate scores for the rank search: how good is a plan, cheaply, without touching ``test``.

Every score is higher-is-better and starts the same way: apply the plan from cached factors, then
recalibrate batch norm exactly (:func:`common.train.bn.bn_recalibrate`) on a fixed, seeded set of augmented
*train* images. Then:

* ``"logit_mse"`` (default, label-free): minus the mean squared difference between the dense model's
  and the candidate's *centered* logits (each image's logits minus their mean over classes: softmax
  ignores that shift) on those same calibration images.
* ``"kl"`` (label-free): minus the mean KL divergence ``KL(p_dense || p_candidate)`` of the softmax
  outputs on those images (the default until 2026-11-30). It weighs each image by the dense model's
  confidence in the classes the candidate moves, so a handful of images can carry the mean: on
  near-optimal plans it ranks worse than ``logit_mse`` on all three baselines.
* ``"top1"``: top-1 accuracy on a fixed val subset (the original proxy; kept for comparison).

Both label-free scores come from the recalibration pass, which already computes the candidate's
outputs: one forward over the calibration images in all, no labels, no validation images spent.
A fidelity measure is smooth in the plan: two near-equal plans differ by a small, consistently signed
amount instead of by a few flipped val labels.

:meth:`ProxyEvaluator.val_top1` gives the val top-1 used to decide among the few best candidates of a
label-free search. How well each score ranks near-optimal plans by their test accuracy is measured
by ``studies/proxy_fidelity/proxy_fidelity.py``, not assumed.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from common.data.loader import calibration_loader, make_loader
from common.data.splits import DatasetSplits
from common.decompose.surgery import LayerPlan, SpectraCache, apply_plan
from common.train.bn import bn_recalibrate
from common.train.evaluate import evaluate


def logit_mse(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Per-image mean over classes of the squared difference of centered logits, shape ``B``.

    Each row is centered (minus its mean over classes) first: softmax is invariant to adding a constant
    to an image's logits, so that direction says nothing about the outputs.
    """
    t = teacher_logits.double()
    s = student_logits.double()
    d = (t - t.mean(dim=1, keepdim=True)) - (s - s.mean(dim=1, keepdim=True))
    return d.square().mean(dim=1)


def kl_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Per-image ``KL(softmax(teacher) || softmax(student))`` in nats, shape ``B``."""
    t = F.log_softmax(teacher_logits.double(), dim=1)
    s = F.log_softmax(student_logits.double(), dim=1)
    return (t.exp() * (t - s)).sum(dim=1)


DIVERGENCES = {"logit_mse": logit_mse, "kl": kl_divergence}
DIVERGENCE_PROXIES = tuple(DIVERGENCES)
"""The label-free proxies: each scores minus a per-image divergence to the dense model, averaged."""
PROXIES = (*DIVERGENCE_PROXIES, "top1")
DEFAULT_PROXY = "logit_mse"


def recalibrated(
    model: nn.Module,
    plan: Mapping[str, LayerPlan],
    spectra: SpectraCache,
    batches: Iterable,
    device: str | torch.device = "cpu",
    channels_last: bool = False,
    outputs: bool = False,
    progress: str | None = None,
):
    """The one way a compressed model is built, for scoring and for reporting alike: ``plan`` applied
    to a copy of ``model`` from cached factors, on ``device`` (channels_last if asked), every BN
    recalibrated exactly on ``batches`` (:func:`common.train.bn.bn_recalibrate`), eval mode.

    ``progress`` labels a bar over the recalibration (``None``: none).

    Returns:
        the model, or ``(model, its outputs on batches)`` with ``outputs``.
    """
    m = apply_plan(model, plan, spectra).to(device)
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
    return bn_recalibrate(m, batches, device, return_outputs=outputs, progress=progress)


def final_model(
    model: nn.Module,
    plan: Mapping[str, LayerPlan],
    spectra: SpectraCache,
    data: DatasetSplits,
    calib_images: int = 4096,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: str | None = None,
) -> nn.Module:
    """A chosen plan's model as every reported number sees it: :func:`recalibrated` on
    ``calib_images`` augmented train images drawn with ``seed`` (contiguous, on ``device``)."""
    loader = calibration_loader(data, calib_images, seed, device=device)
    return recalibrated(model, plan, spectra, loader, device, progress=progress)


class ProxyEvaluator:
    """Score plans of one dense model (see the module docstring).

    Args:
        model: the dense model (never modified).
        data: a :class:`common.data.splits.DatasetSplits`.
        spectra: the dense model's :class:`common.decompose.surgery.SpectraCache`.
        proxy: one of :data:`PROXIES`.
        calib_images: BN-calibration (and, for a label-free proxy, scoring) images from ``train``.
        val_images: val subset for ``"top1"`` and :meth:`val_top1` (``None`` = the whole split).
        seed: picks the calibration subset and its augmentation, and the val subset.
        channels_last / amp_dtype: speed settings for the val forward passes.
    """

    def __init__(
        self,
        model: nn.Module,
        data: DatasetSplits,
        spectra: SpectraCache,
        proxy: str = DEFAULT_PROXY,
        calib_images: int = 256,
        val_images: int | None = None,
        batch_size: int = 250,
        device: str | torch.device = "cpu",
        seed: int = 0,
        channels_last: bool = False,
        amp_dtype: torch.dtype | None = None,
    ):
        if proxy not in PROXIES:
            raise ValueError(f"unknown proxy {proxy!r}; expected one of {PROXIES}")
        self.model, self.spectra, self.device, self.proxy = model, spectra, torch.device(device), proxy
        self.channels_last, self.amp_dtype = channels_last, amp_dtype
        self.seed, self.batch_size = seed, batch_size
        self._calibrate_on(data, calib_images)
        vn = None if val_images is None or val_images >= len(data.val) else val_images
        self.val = list(
            make_loader(data, "val", batch_size, device=self.device, seed=seed, subset=vn, channels_last=channels_last)
        )
        self.val_images = sum(len(y) for _, y in self.val)

    def _calibrate_on(self, data: DatasetSplits, calib_images: int) -> None:
        if calib_images < 2:
            raise ValueError(f"calib_images must be at least 2, got {calib_images}")
        self.calib = [
            x
            for x, _ in calibration_loader(
                data, calib_images, self.seed, self.batch_size, self.device, self.channels_last
            )
        ]
        self.calib_images = sum(len(x) for x in self.calib)
        self._teacher: list[torch.Tensor] | None = None

    def with_calib_images(self, data: DatasetSplits, calib_images: int) -> ProxyEvaluator:
        """This evaluator (same model, proxy, seed and val batches, which are shared, not loaded again)
        on ``calib_images`` calibration images of ``data`` instead."""
        other = copy.copy(self)
        other._calibrate_on(data, calib_images)
        return other

    def teacher_logits(self) -> list[torch.Tensor]:
        """The dense model's own outputs (its checkpoint statistics) on the calibration images."""
        if self._teacher is None:
            m = self.model.to(self.device).eval()
            with torch.inference_mode():
                self._teacher = [m(x).float() for x in self.calib]
        return self._teacher

    def build(self, plan: Mapping[str, LayerPlan], outputs: bool = False):
        """The compressed model for ``plan`` recalibrated on the calibration images (:func:`recalibrated`),
        and its outputs on them if asked."""
        return recalibrated(self.model, plan, self.spectra, self.calib, self.device, self.channels_last, outputs)

    def per_image(self, plan: Mapping[str, LayerPlan], divergence: str | None = None) -> list[torch.Tensor]:
        """``divergence`` (a key of :data:`DIVERGENCES`; default this evaluator's proxy) between the dense
        model and the candidate on every calibration image, one tensor per calibration batch; the
        candidate recalibrated on them all."""
        name = divergence or self.proxy
        if name not in DIVERGENCES:
            raise ValueError(f"{name!r} is not a divergence; expected one of {tuple(DIVERGENCES)}")
        _, outs = self.build(plan, outputs=True)
        return [DIVERGENCES[name](t, s.float()) for t, s in zip(self.teacher_logits(), outs)]

    def divergence(self, plan: Mapping[str, LayerPlan], divergence: str | None = None) -> float:
        """Mean :meth:`per_image` divergence over the calibration images."""
        return sum(batch.sum().item() for batch in self.per_image(plan, divergence)) / self.calib_images

    def val_top1(self, plan: Mapping[str, LayerPlan]) -> float:
        """Top-1 of the recalibrated candidate on the val subset."""
        return float(evaluate(self.build(plan), self.val, device=self.device, amp_dtype=self.amp_dtype)["top1"])

    def score(self, plan: Mapping[str, LayerPlan]) -> float:
        """The search score of ``plan`` under this evaluator's proxy (higher is better)."""
        return -self.divergence(plan) if self.proxy in DIVERGENCES else self.val_top1(plan)
