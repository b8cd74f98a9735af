"""The label-free proxy scores: per-image divergences and how the evaluator averages them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from common.analysis.plot_search import DIVERGENCE_LABELS
from common.decompose.surgery import LayerPlan, SpectraCache, list_conv_layers
from common.search.proxy import DIVERGENCE_PROXIES, DIVERGENCES, PROXIES, ProxyEvaluator, kl_divergence, logit_mse
from tests.test_search import small_cnn


def logits(seed: int, shape=(6, 10)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 3


def test_logit_mse_ignores_a_per_image_shift_and_matches_its_definition():
    t, s = logits(0), logits(1)
    shift = torch.arange(6.0).unsqueeze(1) * 5  # softmax cannot see it
    assert torch.allclose(logit_mse(t, t + shift), torch.zeros(6, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(logit_mse(t, s + shift), logit_mse(t, s), atol=1e-9)
    d = (t - t.mean(1, keepdim=True)) - (s - s.mean(1, keepdim=True))
    assert torch.allclose(logit_mse(t, s), (d**2).mean(1).double(), rtol=1e-6)
    assert (logit_mse(t, s) > 0).all() and logit_mse(t, s).shape == (6,)


def test_kl_divergence_is_torchs_kl_per_image():
    t, s = logits(2), logits(3)
    ref = F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), reduction="none", log_target=True).sum(1)
    assert torch.allclose(kl_divergence(t, s).float(), ref, rtol=1e-5)
    assert torch.allclose(kl_divergence(t, t), torch.zeros(6, dtype=torch.float64), atol=1e-12)


def test_the_label_free_names_agree_everywhere():
    assert set(DIVERGENCE_PROXIES) == set(DIVERGENCES) == set(DIVERGENCE_LABELS)
    assert set(DIVERGENCE_PROXIES) < set(PROXIES) and PROXIES[0] == "logit_mse"  # the default


def test_score_is_minus_the_mean_per_image_divergence_of_the_proxy(digits):
    model = small_cnn()
    name = list_conv_layers(model)[2].name
    plan = {name: LayerPlan("ht2", (8, 8, 8))}
    spectra = SpectraCache(model)
    scores = {}
    for proxy in DIVERGENCE_PROXIES:
        ev = ProxyEvaluator(model, digits, spectra, proxy=proxy, calib_images=50, batch_size=16, seed=4)
        per = torch.cat(ev.per_image(plan))
        assert per.shape == (50,) and (per >= 0).all()  # 16 + 16 + 16 + 2 images, weighted per image
        assert ev.score(plan) == pytest.approx(-float(per.mean()), rel=1e-9)
        assert ev.divergence(plan, proxy) == pytest.approx(float(per.mean()), rel=1e-9)
        scores[proxy] = ev.score(plan)
    assert scores["kl"] != pytest.approx(scores["logit_mse"])  # two different measures
    with pytest.raises(ValueError, match="'top1' is not a divergence"):
        ev.per_image(plan, "top1")
