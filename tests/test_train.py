"""Tests for common.train (evaluate, bn, finetune, checkpoint): evaluation, BN recalibration, fine-tuning (incl. 2-process DDP)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from common.data.datasets import load_dataset
from common.data.loader import BatchLoader, make_loader
from common.data.splits import TensorSplit
from common.device import resolve_device
from common.paths import CHECKPOINT_DIR, CIFAR_JPEG_ROOT
from common.train.bn import bn_recalibrate
from common.train.evaluate import evaluate
from common.train.finetune import FinetuneConfig, finetune

HAVE_SHARED = CIFAR_JPEG_ROOT.is_dir() and (CHECKPOINT_DIR / "manifest.json").is_file()


def tiny_cnn(seed: int = 0, bn: bool = True) -> nn.Module:
    """A ~10k-parameter CNN for 3x32x32 inputs: an epoch of digits takes well under a second."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=not bn),
        nn.BatchNorm2d(16) if bn else nn.Identity(),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, bias=not bn),
        nn.BatchNorm2d(32) if bn else nn.Identity(),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


pytestmark = pytest.mark.one_thread  # identical results need identical thread counts


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")


def test_evaluate_counts_exactly():
    """A fixed 'model' whose logits are the labels' one-hot except for known rows."""
    n = 10
    split = TensorSplit(torch.zeros(n, 3, 2, 2, dtype=torch.uint8), torch.arange(n) % 10)
    table = torch.eye(10)[split.labels]
    table[:3] = torch.eye(10)[(split.labels[:3] + 1) % 10]  # 3 wrong at top-1
    table[:3] += 0.5 * torch.eye(10)[split.labels[:3]]  # ... but right at top-2

    class Lookup(nn.Module):
        def __init__(self):
            super().__init__()
            self.i = 0

        def forward(self, x):
            out = table[self.i : self.i + len(x)]
            self.i += len(x)
            return out

    r = evaluate(Lookup(), BatchLoader(split, 4, (0.0,) * 3, (1.0,) * 3))
    assert r["n"] == 10 and r["top1"] == pytest.approx(0.7) and r["top5"] == pytest.approx(1.0)
    expected = nn.functional.cross_entropy(table, split.labels).item()
    assert r["loss"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SHARED, reason="../shared data/checkpoints absent")
def test_evaluate_reproduces_alexnet_manifest_val():
    from common.models import load_baseline, manifest

    data = load_dataset("cifar10-jpeg")
    torch.set_num_threads(2)
    r = evaluate(load_baseline("alexnet"), make_loader(data, "val", 500))
    assert r["n"] == 5000
    assert r["top1"] == pytest.approx(manifest()["models"]["alexnet"]["accuracy"]["val"], abs=1e-3)


def test_bn_recalibrate_without_bn_is_noop():
    class Exploding:
        device = torch.device("cpu")

        def __iter__(self):
            raise AssertionError("a model without BN must not read the data")

    model = tiny_cnn(bn=False).train()
    before = copy.deepcopy(model.state_dict())
    assert bn_recalibrate(model, Exploding()) is model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bn_recalibrate_restores_accuracy(digits):
    model = tiny_cnn()
    finetune(
        model, digits, 4, batch_size=64, lr=0.1, device="cpu", augment=False, progress=False, eval_every_epoch=False
    )
    val = make_loader(digits, "val", 512)
    good = evaluate(model, val)["top1"]
    assert good > 0.8
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.add_(torch.randn(m.running_mean.shape, generator=g) * 3)
            m.running_var.mul_(10)
    broken = evaluate(model, val)["top1"]
    assert broken < good - 0.2
    bn_recalibrate(model, make_loader(digits, "train", 128))
    assert evaluate(model, val)["top1"] >= good - 0.03


def _history_wo_time(h):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in h]


def test_finetune_deterministic_on_cpu(digits):
    """The same recipe twice, once by keywords and once as a FinetuneConfig: the same training."""
    runs = []
    recipe = FinetuneConfig(0.5, batch_size=64, lr=0.1, seed=11, val_subset=100)
    for call in (
        lambda m: finetune(
            m, digits, 0.5, batch_size=64, lr=0.1, device="cpu", seed=11, progress=False, val_subset=100
        ),
        lambda m: finetune(m, digits, recipe, device="cpu", progress=False),
    ):
        model = tiny_cnn(seed=3)
        h = call(model)
        runs.append((_history_wo_time(h), model.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(v, runs[1][1][k]) for k, v in runs[0][1].items())
    other = finetune(tiny_cnn(seed=3), digits, recipe, seed=12, device="cpu", progress=False)  # an override
    assert _history_wo_time(other) != runs[0][0]


def test_finetune_config_checks_and_precision():
    with pytest.raises(ValueError, match="epochs must be positive"):
        FinetuneConfig(0)
    with pytest.raises(TypeError):
        finetune(tiny_cnn(), None, 1, no_such_setting=1)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert FinetuneConfig(1).precision(cpu) == (False, None)
    assert FinetuneConfig(1).precision(cuda) == (True, torch.bfloat16)
    assert FinetuneConfig(1, channels_last=False, amp=torch.float16).precision(cuda) == (False, torch.float16)
    assert FinetuneConfig(1, amp=True).precision(cpu) == (False, torch.bfloat16)


def test_finetune_lowers_loss_and_fractional_epochs(digits):
    model = tiny_cnn()
    seen = []
    h = finetune(
        model,
        digits,
        2.5,
        batch_size=64,
        lr=0.1,
        device="cpu",
        augment=False,
        progress=False,
        on_epoch_end=lambda rec, m: seen.append(rec["epoch"]),
    )
    steps = len(digits.train) // 64
    assert [r["epoch"] for r in h] == pytest.approx([1.0, 2.0, round(2.5 * steps) / steps])
    assert seen == [r["epoch"] for r in h]
    assert h[-1]["images_seen"] == round(2.5 * steps) * 64
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    assert h[-1]["val_top1"] > 0.5
    assert not model.training


def test_finetune_kd_adamw_cosine_max_images(digits):
    teacher = tiny_cnn(seed=1)
    finetune(
        teacher, digits, 2, batch_size=64, lr=0.1, device="cpu", augment=False, progress=False, eval_every_epoch=False
    )
    student = tiny_cnn(seed=2)
    h = finetune(
        student,
        digits,
        1,
        batch_size=32,
        lr=3e-3,
        optimizer="adamw",
        schedule="cosine",
        teacher=teacher,
        kd_alpha=0.7,
        max_images=320,
        device="cpu",
        progress=False,
        label_smoothing=0.1,
    )
    assert len(h) == 1 and h[0]["images_seen"] == 320
    assert h[0]["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine ends at 0
    assert all(not p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="optimizer"):
        finetune(tiny_cnn(), digits, 0.1, optimizer="lamb", device="cpu", progress=False)


def _ddp_worker(rank: int, world: int, tmp: str) -> None:
    import torch.distributed as dist

    from common.dist import leaving

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    # leaving(): a barrier before teardown, or a rank that tore down first could abort its peer (gloo SIGABRT)
    with leaving():
        data = load_dataset("digits")
        model = tiny_cnn(seed=0)
        h = finetune(
            model,
            data,
            1,
            batch_size=64,
            lr=0.1,
            device="cpu",
            seed=5,
            hflip=False,
            max_images=256,
            progress=False,
            val_subset=120,
        )
        torch.save({"state": model.state_dict(), "history": h}, f"{tmp}/rank{rank}.pt")


@pytest.mark.slow
def test_finetune_ddp_two_processes_identical(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["state"].keys() == r1["state"].keys()
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k
    before = tiny_cnn(seed=0).state_dict()
    assert not torch.equal(before["0.weight"], r0["state"]["0.weight"])  # it did train
    h0, h1 = _history_wo_time(r0["history"]), _history_wo_time(r1["history"])
    assert h0 == h1  # metrics were all-reduced
    assert h0[0]["images_seen"] == 256  # 4 global batches of 64, 32 per rank


def test_train_baseline_smoke(tmp_path):
    import hashlib
    import json

    from common.models import build_model, load_checkpoint
    from finetuned.train_baseline import main

    side = main(
        [
            "--model",
            "alexnet",
            "--dataset",
            "digits",
            "--epochs",
            "1",
            "--max-images",
            "64",
            "--batch-size",
            "32",
            "--out",
            str(tmp_path),
            "--no-progress",
            "--fp16",
            "--allow-chance",  # 64 images, one epoch: a smoke run, not a baseline
        ]
    )
    pt, js = tmp_path / "alexnet-digits.pt", tmp_path / "alexnet-digits.json"
    assert pt.is_file() and js.is_file() and not list(tmp_path.glob("*.tmp"))
    on_disk = json.loads(js.read_text())
    assert on_disk["sha256"] == hashlib.sha256(pt.read_bytes()).hexdigest() == side["sha256"]
    assert on_disk["recipe"]["batch_size"] == 32 and on_disk["seed"] == 0
    assert on_disk["n"] == {"val": 359, "test": 360}
    assert 0.0 <= on_disk["accuracy"]["test"] <= 1.0
    assert on_disk["at_chance"] == (on_disk["accuracy"]["val"] < 0.2)  # marked, when saved at chance
    assert on_disk["history"][0]["images_seen"] == 64
    sd = torch.load(pt, weights_only=True)
    assert sd["features.0.weight"].dtype == torch.float16
    load_checkpoint(build_model("alexnet"), pt)  # loads back strictly


def test_each_model_gets_a_digits_recipe_that_trains_it(tmp_path):
    """AlexNet (no batch norm) on digits once got ResNet-18's recipe (SGD at lr 0.05, weight decay 0.1) and
    ended at chance (val 10.0 %): it has its own. Trained with its default recipe, three epochs instead of
    its eight to stay short, it beats chance (10 %) by far."""
    from finetuned.train_baseline import DEFAULTS, main, recipe_defaults

    resnet, alexnet, vgg = (recipe_defaults(m, "digits") for m in ("resnet18", "alexnet", "vgg16"))
    assert resnet == DEFAULTS["digits"]  # the ResNet-18 recipe is the one the committed digits runs used
    assert alexnet["optimizer"] == "adamw" and alexnet != resnet and vgg != resnet
    side = main(["--model", "alexnet", "--dataset", "digits", "--epochs", "3", "--out", str(tmp_path), "--no-progress"])
    assert side["recipe"]["optimizer"] == "adamw" and side["recipe"]["lr"] == alexnet["lr"]
    assert side["accuracy"]["val"] > 0.5 and not side["at_chance"]


def test_a_baseline_at_chance_is_refused_not_saved(tmp_path, monkeypatch, capsys):
    """A recipe that does not train (here: a fifth of an epoch on 64 images) is refused by name, nothing
    saved; an experiment that trains its missing baseline refuses the run (exit 2, no traceback, no log)."""
    import finetuned.train_baseline as tb
    from common.run import experiment

    args = ["--model", "alexnet", "--dataset", "digits", "--epochs", "0.2", "--max-images", "64", "--no-progress"]
    with pytest.raises(tb.UntrainedBaselineError, match=r"baseline alexnet-digits: val top-1 .* is chance level"):
        tb.main([*args, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())

    monkeypatch.setenv("HTD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(tb.MODEL_DEFAULTS, ("digits", "alexnet"), {"epochs": 0.05})
    with pytest.raises(SystemExit) as exc:
        experiment.main(["--model", "alexnet", "--dataset", "digits", "--log-dir", str(tmp_path / "logs"), "--quiet"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "is chance level" in err and "Traceback" not in err
    assert list((tmp_path / "logs").rglob("*.log")) == []


class _Interrupted(Exception):
    pass


class _EpochKeeper:
    """An ``on_epoch_end`` with state, as the experiment's best-epoch keeper has."""

    def __init__(self):
        self.epochs: list[float] = []

    def __call__(self, rec, _model):
        self.epochs.append(rec["epoch"])

    def state_dict(self):
        return {"epochs": list(self.epochs)}

    def load_state_dict(self, state):
        self.epochs = list(state["epochs"])


def _dropout_cnn() -> nn.Module:
    """tiny_cnn with dropout, so a resume must also restore the global RNG."""
    m = tiny_cnn(seed=5)
    return nn.Sequential(*list(m)[:-1], nn.Dropout(0.3), list(m)[-1])


def test_finetune_resumes_mid_epoch_bit_identically(digits, tmp_path, monkeypatch):
    """Interrupted inside its second epoch and resumed from the checkpoint, a run ends with the very
    weights, history and callback state of an uninterrupted one; a finished checkpoint trains nothing."""
    recipe = {"batch_size": 64, "lr": 0.05, "seed": 4, "device": "cpu", "val_subset": 100}
    ref_keeper = _EpochKeeper()
    ref_model = _dropout_cnn()
    ref = finetune(ref_model, digits, 2.5, progress=False, on_epoch_end=ref_keeper, **recipe)

    ckpt = tmp_path / "ft.pt"
    steps_per_epoch = len(digits.train) // 64
    stop_at = steps_per_epoch + 5  # inside the second epoch
    calls = {"n": 0}
    sgd_step = torch.optim.SGD.step

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > stop_at:
            raise _Interrupted
        return sgd_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    keeper = _EpochKeeper()
    with pytest.raises(_Interrupted):
        finetune(
            _dropout_cnn(),
            digits,
            2.5,
            progress=False,
            on_epoch_end=keeper,
            checkpoint=ckpt,
            checkpoint_every=0,
            **recipe,
        )
    assert ckpt.exists() and keeper.epochs == [1.0]
    monkeypatch.setattr(torch.optim.SGD, "step", sgd_step)

    keeper, model, lines = _EpochKeeper(), _dropout_cnn(), []
    torch.manual_seed(123)  # the checkpoint's RNG state must win over whatever came before
    hist = finetune(
        model,
        digits,
        2.5,
        progress="resumed",
        say=lines.append,
        on_epoch_end=keeper,
        checkpoint=ckpt,
        checkpoint_every=3600,
        **recipe,
    )
    assert _history_wo_time(hist) == _history_wo_time(ref)
    assert keeper.epochs == ref_keeper.epochs == [r["epoch"] for r in ref]
    assert all(torch.equal(v, ref_model.state_dict()[k]) for k, v in model.state_dict().items())
    assert any("s/step" in line and "steps left" in line for line in lines), lines

    calls["n"] = 0
    monkeypatch.setattr(torch.optim.SGD, "step", step)
    again = finetune(_dropout_cnn(), digits, 2.5, progress=False, checkpoint=ckpt, **recipe)
    assert calls["n"] == 0 and _history_wo_time(again) == _history_wo_time(ref)


def test_finetune_refuses_a_checkpoint_of_another_recipe(digits, tmp_path):
    ckpt = tmp_path / "ft.pt"
    finetune(tiny_cnn(), digits, 0.2, batch_size=64, lr=0.05, device="cpu", progress=False, checkpoint=ckpt)
    with pytest.raises(ValueError, match=r"ft\.pt.*recipe\.lr"):
        finetune(tiny_cnn(), digits, 0.2, batch_size=64, lr=0.1, device="cpu", progress=False, checkpoint=ckpt)
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"ft\.pt.*unreadable"):
        finetune(tiny_cnn(), digits, 0.2, batch_size=64, lr=0.05, device="cpu", progress=False, checkpoint=ckpt)


def test_finetune_discards_a_checkpoint_of_another_owner(digits, tmp_path):
    """A checkpoint names what it finetunes (its owner): one saved for something else is stale state,
    discarded with a message naming what differs, and the finetuning starts from its beginning."""
    ckpt = tmp_path / "ft.pt"
    recipe = {"batch_size": 64, "lr": 0.05, "device": "cpu", "progress": False, "checkpoint": ckpt}
    owner_a = {"log": "r begun at 1.0", "dense_checkpoint": "aaa", "plan": "p"}
    finetune(tiny_cnn(), digits, 0.2, checkpoint_owner=owner_a, **recipe)
    lines: list[str] = []
    finetune(tiny_cnn(), digits, 0.2, checkpoint_owner=owner_a, say=lines.append, **recipe)
    assert any(f"resuming from the finetune checkpoint {ckpt}" in line for line in lines), lines

    lines.clear()
    owner_b = {**owner_a, "log": "r begun at 2.0", "dense_checkpoint": "bbb"}
    model = tiny_cnn(seed=1)
    finetune(model, digits, 0.2, checkpoint_owner=owner_b, say=lines.append, **recipe)
    assert lines == [
        f"discarded the finetune checkpoint {ckpt}: it belongs to another dense_checkpoint, log; "
        "this finetuning starts from its beginning"
    ]
    ref = tiny_cnn(seed=1)
    finetune(ref, digits, 0.2, **{**recipe, "checkpoint": None})
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())
    assert torch.load(ckpt, weights_only=True)["owner"] == owner_b  # the new state says whose it is

    ckpt.unlink()
    finetune(tiny_cnn(), digits, 0.2, **recipe)  # saved without an owner (as before owners existed)
    lines.clear()
    finetune(tiny_cnn(), digits, 0.2, checkpoint_owner=owner_a, say=lines.append, **recipe)
    assert len(lines) == 1 and "it does not say what it finetunes" in lines[0]
