"""Exact BN recalibration (common.train.bn): population statistics, independent of batch boundaries."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.data.loader import make_loader
from common.models import build_model, load_baseline, manifest
from common.paths import CHECKPOINT_DIR, CIFAR_JPEG_ROOT
from common.train import bn as bnmod
from common.train.bn import bn_modules, bn_recalibrate
from common.train.evaluate import evaluate

HAVE_SHARED = CIFAR_JPEG_ROOT.is_dir() and (CHECKPOINT_DIR / "manifest.json").is_file()


pytestmark = pytest.mark.one_thread


def _images(n: int, seed: int = 0, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g) * 2 + 0.5


def _batches(x: torch.Tensor, b: int) -> list[torch.Tensor]:
    return list(x.split(b))


def _stats(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(m.running_mean.clone(), m.running_var.clone()) for m in bn_modules(model)]


def _resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("resnet18", num_classes=10).eval()


def test_single_bn_gets_population_mean_and_unbiased_var():
    x = _images(13)
    bn = nn.BatchNorm2d(3, momentum=0.3)
    bn.running_mean.fill_(7.0)
    model = nn.Sequential(bn)
    bn_recalibrate(model, _batches(x, 5))  # batches of 5, 5 and 3: unequal on purpose
    assert torch.allclose(bn.running_mean, x.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(bn.running_var, x.var(dim=(0, 2, 3), unbiased=True), rtol=1e-6)
    assert bn.momentum == 0.3 and not model.training


def test_stats_do_not_depend_on_batch_size():
    x = _images(250, size=32)
    a, b = _resnet(), _resnet()
    bn_recalibrate(a, _batches(x, 7))
    bn_recalibrate(b, _batches(x, 250))
    for (ma, va), (mb, vb) in zip(_stats(a), _stats(b)):
        assert torch.allclose(ma, mb, rtol=1e-5, atol=1e-6 * mb.abs().max().item())
        assert torch.allclose(va, vb, rtol=1e-5)


def test_each_bn_sees_its_input_in_eval_mode():
    """After recalibration, every BN's stats equal its input's statistics in an eval-mode forward."""
    x = _images(64, size=32)
    model = _resnet()
    bn_recalibrate(model, _batches(x, 16))
    seen = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, inp: seen.__setitem__(mod, inp[0].detach())) for m in bn_modules(model)
    ]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    for m in bn_modules(model):
        inp = seen[m].double()
        assert torch.allclose(m.running_mean.double(), inp.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
        assert torch.allclose(m.running_var.double(), inp.var(dim=(0, 2, 3), unbiased=True), rtol=1e-4)


def test_outputs_are_the_recalibrated_models_eval_outputs():
    x = _images(40, size=32)
    model = _resnet()
    _, outs = bn_recalibrate(model, _batches(x, 16), return_outputs=True)
    assert [o.shape[0] for o in outs] == [16, 16, 8]
    with torch.no_grad():
        ref = model.eval()(x)
    assert torch.allclose(torch.cat(outs), ref, rtol=1e-4, atol=1e-5)


def test_fallback_without_fx_matches_traced(monkeypatch):
    x = _images(48, size=32)
    a, b = _resnet(), _resnet()
    _, out_a = bn_recalibrate(a, _batches(x, 16), return_outputs=True)
    monkeypatch.setattr(bnmod, "_trace", lambda model: None)
    _, out_b = bn_recalibrate(b, _batches(x, 16), return_outputs=True)
    for (ma, va), (mb, vb) in zip(_stats(a), _stats(b)):
        assert torch.allclose(ma, mb, rtol=1e-5, atol=1e-6) and torch.allclose(va, vb, rtol=1e-5)
    assert torch.allclose(torch.cat(out_a), torch.cat(out_b), rtol=1e-4, atol=1e-5)


def test_untraceable_model_uses_the_fallback():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return y if y.sum() > -1e9 else -y  # control flow on a value: fx cannot trace it

    x = _images(20)
    model = Branchy()
    bn_recalibrate(model, _batches(x, 6))
    inp = model.conv(x).detach()
    assert torch.allclose(model.bn.running_mean, inp.mean(dim=(0, 2, 3)), atol=1e-5)


def test_bn_called_twice_is_refused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.bn(x))

    with pytest.raises(ValueError, match="'bn' is called more than once"):
        bn_recalibrate(Twice(), [_images(4)])


def test_no_batches_and_single_value_are_errors():
    with pytest.raises(ValueError, match="no batches"):
        bn_recalibrate(nn.Sequential(nn.BatchNorm2d(3)), [])
    with pytest.raises(ValueError, match="saw 1 value"):
        bn_recalibrate(nn.Sequential(nn.BatchNorm1d(3)), [torch.randn(1, 3)])


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SHARED, reason="needs ../shared CIFAR-10 data and baselines")
@pytest.mark.parametrize("name", ["resnet18", "vgg16"])
def test_recalibrated_dense_baseline_keeps_its_accuracy(name):
    """Recalibrating a trained dense model as every final model is (4,096 augmented train images) moves
    val and test by at most 0.1 pp."""
    from common.data.datasets import load_dataset
    from common.data.loader import calibration_loader
    from common.run.config import ExperimentConfig

    torch.set_num_threads(2)
    data = load_dataset("cifar10-jpeg")
    model = load_baseline(name)
    acc = manifest()["models"][name]["accuracy"]
    bn_recalibrate(model, calibration_loader(data, ExperimentConfig.final_calib_images, seed=0))
    for split in ("val", "test"):
        top1 = evaluate(model, make_loader(data, split, 500))["top1"]
        assert top1 == pytest.approx(acc[split], abs=1e-3), split
