"""Tests for common.models: architectures, parameter counts, checkpoint loading."""

from __future__ import annotations

import hashlib

import pytest
import torch

from common.models import MODEL_NAMES, build_model, count_params, input_size, load_baseline, load_checkpoint, manifest
from common.paths import CHECKPOINT_DIR

HAVE_CKPT = (CHECKPOINT_DIR / "manifest.json").is_file()
CIFAR = ("resnet18", "vgg16", "alexnet")
# torchvision's published parameter counts for the 1000-class ImageNet models
IMAGENET_PARAMS = {
    "resnet18_imagenet": 11_689_512,
    "vgg16_imagenet": 138_357_544,
    "alexnet_imagenet": 61_100_840,
    "mobilenet_v2_imagenet": 3_504_872,
}
pytestmark = pytest.mark.one_thread


@pytest.mark.parametrize("name", CIFAR)
def test_cifar_models_forward_32(name):
    torch.manual_seed(0)
    m = build_model(name).eval()
    assert input_size(name) == 32
    with torch.no_grad():
        out = m(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    if name != "vgg16":  # vgg16_bn builds (then drops) a 120M-parameter classifier: slow
        assert build_model(name, num_classes=7).eval()(torch.randn(1, 3, 32, 32)).shape == (1, 7)


@pytest.mark.skipif(not HAVE_CKPT, reason="../shared/checkpoints absent")
@pytest.mark.parametrize("name", CIFAR)
def test_cifar_models_match_manifest(name):
    info = manifest()["models"][name]
    m = build_model(name)
    assert count_params(m) == info["params"]
    shapes = {k: list(v.shape) for k, v in m.state_dict().items()}
    assert shapes == info["state_dict"]
    convs = [x for x in m.modules() if isinstance(x, torch.nn.Conv2d)]
    assert len(convs) == info["conv2d_layers"]


@pytest.mark.parametrize("name", sorted(IMAGENET_PARAMS))
def test_imagenet_models_forward_224(name):
    torch.manual_seed(0)
    m = build_model(name).eval()
    assert count_params(m) == IMAGENET_PARAMS[name]
    assert input_size(name) == 224
    with torch.no_grad():
        assert m(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError) as err:
        build_model("resnet50")
    for name in MODEL_NAMES:
        assert name in str(err.value)


def test_load_checkpoint_roundtrip_fp16_and_wrappers(tmp_path):
    torch.manual_seed(1)
    src = build_model("alexnet")
    half = {k: v.half() for k, v in src.state_dict().items()}
    variants = {
        "plain": half,
        "model": {"model": half, "epoch": torch.tensor(3)},
        "state_dict": {"state_dict": half},
        "ddp": {f"module.{k}": v for k, v in half.items()},
    }
    for tag, obj in variants.items():
        path = tmp_path / f"{tag}.pt"
        torch.save(obj, path)
        torch.manual_seed(2)
        dst = load_checkpoint(build_model("alexnet"), path)
        w = dst.state_dict()["classifier.6.weight"]
        assert w.dtype == torch.float32
        assert torch.equal(w, half["classifier.6.weight"].float()), tag


def test_load_checkpoint_errors(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save(build_model("resnet18").state_dict(), path)
    with pytest.raises(ValueError) as err:
        load_checkpoint(build_model("alexnet"), path)
    msg = str(err.value)
    assert str(path) in msg and "missing" in msg and "unexpected" in msg
    assert "features.0.weight" in msg and "conv1.weight" in msg
    with pytest.raises(ValueError, match=r"fc\.weight.*\(10, 512\)"):
        load_checkpoint(build_model("resnet18", num_classes=100), path)
    missing = tmp_path / "nope" / "x.pt"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_checkpoint(build_model("alexnet"), missing)
    junk = tmp_path / "junk.pt"
    torch.save([1, 2, 3], junk)
    with pytest.raises(ValueError, match="junk.pt"):
        load_checkpoint(build_model("alexnet"), junk)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        manifest(tmp_path)


def test_build_model_weights_path(tmp_path):
    torch.manual_seed(3)
    src = build_model("alexnet")
    torch.save(src.state_dict(), tmp_path / "w.pt")
    m = build_model("alexnet", weights_path=tmp_path / "w.pt")
    assert torch.equal(m.features[0].weight, src.features[0].weight)


@pytest.mark.skipif(not HAVE_CKPT, reason="../shared/checkpoints absent")
@pytest.mark.parametrize("name", CIFAR)
def test_load_baseline(name):
    info = manifest()["models"][name]
    digest = hashlib.sha256((CHECKPOINT_DIR / info["file"]).read_bytes()).hexdigest()
    assert digest == info["sha256"]
    m = load_baseline(name)
    assert not m.training
    assert all(p.dtype == torch.float32 for p in m.parameters())
    raw = torch.load(CHECKPOINT_DIR / info["file"], map_location="cpu", weights_only=True)
    k = next(iter(raw))
    assert torch.equal(m.state_dict()[k], raw[k].float())
