"""Shared fixtures: the embedded digits dataset and quick, deterministic digits checkpoints.

Training a real digits baseline takes minutes on a CPU, so tests that run whole experiments use
``digits_checkpoint(model)`` instead: a seeded variance-preserving random init whose BN statistics
are recalibrated on the train split and whose last ``Linear`` is fitted in closed form (ridge
regression on one-hot labels over the penultimate features). For AlexNet that gives ~98 % val
accuracy in a few seconds, so compression visibly costs accuracy and the searches have a real
signal to follow; ``fit=False`` keeps the plain random init (cheapest, for smoke runs).
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting make MKL's small eigh/SVD calls 100-1000x slower whenever the
# cores are shared (a notebook kernel beside pytest, other jobs); must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from torch import nn  # noqa: E402

from common.data.datasets import load_dataset  # noqa: E402
from common.data.loader import make_loader  # noqa: E402
from common.data.splits import DatasetSplits  # noqa: E402
from common.models import build_model  # noqa: E402
from common.train.bn import bn_recalibrate  # noqa: E402

# One hypothesis profile for the property tests: derandomized (seeded), no deadline on shared CPUs.
settings.register_profile(
    "ht2-tests",
    derandomize=True,
    deadline=None,
    max_examples=25,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def pytest_collection_modifyitems(config, items):
    """A study's tests (``studies/<name>/test_*.py``) replay one-off studies: the full suite (``make test``)
    runs them, the quick tier (``make test-fast``, ``-m "not slow"``) does not."""
    studies = Path(__file__).resolve().parent / "studies"
    for item in items:
        if studies in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True, scope="module")
def _one_thread_if_marked(request):
    """Modules marked ``pytestmark = pytest.mark.one_thread`` run on one intra-op thread: identical
    results need identical thread counts, and two OpenMP threads spinning on a shared 2-core machine
    can make a decomposition ~100x slower. Module scope also covers the module's own fixtures."""
    if request.node.get_closest_marker("one_thread") is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def digits() -> DatasetSplits:
    return load_dataset("digits")


def _fit_last_linear(model: nn.Module, data: DatasetSplits, ridge: float = 1e-2) -> None:
    """Set the model's last ``nn.Linear`` to the ridge-regression readout of its input features."""
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, inp, _out: feats.append(inp[0].detach().double()))
    try:
        with torch.no_grad():
            for x, y in make_loader(data, "train", 256, train=False):
                model(x)
                labels.append(y)
    finally:
        hook.remove()
    f = torch.cat(feats)
    f = torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype)], 1)  # bias column
    y = nn.functional.one_hot(torch.cat(labels), data.num_classes).double()
    gram = f.T @ f
    lam = ridge * gram.diagonal().mean()  # relative ridge: scale-free across models
    w = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=f.dtype), f.T @ y)
    head.weight.data.copy_(w[:-1].T.float())
    head.bias.data.copy_(w[-1].float())


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory, digits) -> Callable[..., Path]:
    """Factory ``(model, fit=True) -> state_dict path`` (built once per session, seed 0)."""
    root = tmp_path_factory.mktemp("checkpoints")
    made: dict[tuple[str, bool], Path] = {}

    def make(model: str, fit: bool = True) -> Path:
        key = (model, fit)
        if key not in made:
            torch.manual_seed(0)
            net = build_model(model, num_classes=digits.num_classes).eval()
            if fit:
                for m in net.modules():
                    if isinstance(m, (nn.Conv2d, nn.Linear)):
                        nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                        if m.bias is not None:
                            nn.init.zeros_(m.bias)
                if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
                    bn_recalibrate(net, make_loader(digits, "train", 256, train=False))
                _fit_last_linear(net.eval(), digits)
            path = root / f"{model}-{'fit' if fit else 'random'}.pt"
            torch.save(net.state_dict(), path)
            made[key] = path
        return made[key]

    return make
