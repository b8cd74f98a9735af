"""The htd-*-res notebooks: clean and parameterized as committed, and they run end to end (papermill,
smoke parameters on the embedded digits data) writing a complete run log."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import nbformat
import pytest

from common.logs import parse_log
from common.search import METHODS

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = {"htd-alexnet-res.ipynb": "alexnet", "htd-vgg-res.ipynb": "vgg16", "htd-resnet-res.ipynb": "resnet18"}
PARAMETERS = (
    "MODEL",
    "DATASET",
    "DATA_ROOT",
    "CHECKPOINT",
    "TARGET",
    "METHODS",
    "SEARCH_BUDGET",
    "FINETUNE",
    "CALIB_IMAGES",
    "VAL_IMAGES",
    "SENSITIVITY_LEVELS",
    "DEVICE",
    "SEED",
    "RUN_ID",
    "LOG_DIR",
)
SMOKE_SECONDS = 120  # the budget each smoke run must fit on a 2-core CPU machine
# ResNet-18 costs ~2.5x AlexNet per image, and every final model is evaluated on val+test twice and
# finetuned: with all five methods its smoke run takes ~2.5 min on 2 cores. It runs one method of each
# kind (closed form, sampling, sensitivity-guided); the AlexNet and VGG notebooks run all five.
SMOKE_METHODS = {"resnet18": ["uniform", "random", "policy"]}


def code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_is_clean_and_parameterized(name):
    nb = nbformat.read(REPO / name, as_version=nbformat.NO_CONVERT)
    nbformat.validate(nb)
    assert nb.nbformat == 4 and nb.metadata.kernelspec.name == "python3"
    cells = code_cells(nb)
    params = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and params[0] is cells[0], "one 'parameters' cell, the first code cell"
    assigned = {line.split("=")[0].strip() for line in params[0].source.splitlines() if "=" in line}
    assert set(PARAMETERS) <= assigned, set(PARAMETERS) - assigned
    assert f'MODEL = "{NOTEBOOKS[name]}"' in params[0].source
    for c in cells:
        assert c.outputs == [] and c.execution_count is None, f"{name}: committed output in cell {c.id}"
        for line in c.source.splitlines():
            # Logic belongs in common/ (tested there): the notebook only sets parameters and calls it.
            assert not line.lstrip().startswith(("def ", "class ", "lambda", "for ", "while ")), (name, line)
            if line.startswith(("import ", "from ")):
                assert line.startswith("from common."), (name, line)


@pytest.fixture(scope="module")
def python3_kernel(tmp_path_factory, monkeypatch_module):
    """A ``python3`` kernelspec that runs this interpreter, found first on JUPYTER_PATH."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (tests)",
                "language": "python",
            }
        )
    )
    monkeypatch_module.setenv("JUPYTER_PATH", str(root))
    return "python3"


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_runs_with_smoke_parameters(name, tmp_path, python3_kernel, digits_checkpoint):
    papermill = pytest.importorskip("papermill")
    model = NOTEBOOKS[name]
    methods = SMOKE_METHODS.get(model, list(METHODS))
    params = dict(
        DATASET="digits",
        CHECKPOINT=str(digits_checkpoint(model, fit=False)),
        SEARCH_BUDGET=3,
        FINETUNE=0.05,
        TARGET=3.0,
        METHODS=methods,
        CALIB_IMAGES=64,
        VAL_IMAGES=100,
        SENSITIVITY_LEVELS=[0.3],
        SEED=0,
        RUN_ID="smoke",
        LOG_DIR=str(tmp_path / "logs"),
    )
    out = tmp_path / name
    t0 = time.perf_counter()
    papermill.execute_notebook(
        str(REPO / name),
        str(out),
        parameters=params,
        kernel_name=python3_kernel,
        cwd=str(REPO),
        progress_bar=False,
        execution_timeout=2 * SMOKE_SECONDS,
    )
    seconds = time.perf_counter() - t0
    print(f"{name}: {seconds:.1f}s")
    # Twice the budget, so a busy machine does not fail it; the budget itself is what README states.
    assert seconds < 2 * SMOKE_SECONDS, f"{name} took {seconds:.0f}s"

    records, errors = parse_log(tmp_path / "logs" / model / "smoke.log")
    assert errors == []
    kinds = [r["kind"] for r in records]
    assert kinds.count("config") == 1 and kinds.count("baseline") == 1 and kinds[-1] == "end"
    assert {r["method"] for r in records if r["kind"] == "final"} == set(methods)
    for method in methods:
        for kind in ("plan", "final"):
            (rec,) = [r for r in records if r["kind"] == kind and r["method"] == method]
            assert abs(rec["macs_factor"] / 3.0 - 1) <= 0.03, (kind, method, rec["macs_factor"])
        (final,) = [r for r in records if r["kind"] == "final" and r["method"] == method]
        assert final["finetune_epochs"] == 0.05 and 0.0 <= final["test_top1_ft"] <= 1.0

    executed = nbformat.read(out, as_version=4)
    by_id = {c.get("id"): c for c in executed.cells}
    table = by_id["results"].outputs[0]["data"]["text/plain"]
    assert all(m in table for m in methods)
    for cell in ("acc", "ranks", "sens", "trace"):
        assert any("image/png" in o.get("data", {}) for o in by_id[cell].outputs), f"{name}: no plot in {cell}"


def test_default_params_follow_the_shared_folder():
    from common.notebook import default_params
    from common.paths import CHECKPOINT_DIR, CIFAR_JPEG_ROOT

    p = default_params("vgg16")
    if CIFAR_JPEG_ROOT.is_dir() and (CHECKPOINT_DIR / "vgg16.pt").is_file():
        assert p == {
            "dataset": "cifar10-jpeg",
            "data_root": str(CIFAR_JPEG_ROOT),
            "checkpoint": str(CHECKPOINT_DIR / "vgg16.pt"),
        }
    else:
        assert p == {"dataset": "digits", "data_root": None, "checkpoint": "auto"}
    with pytest.raises(ValueError, match="unknown model 'vgg19'"):
        default_params("vgg19")


def test_experiment_config_maps_notebook_parameters(tmp_path):
    from common.config import DEFAULT_FINETUNE_EPOCHS
    from common.notebook import default_params, experiment_config, log_path

    cfg = experiment_config(
        "alexnet",
        finetune_epochs=0.0,
        targets=2.5,
        methods=["uniform", "policy"],
        sensitivity_levels=[0.5, 0.2],
        log_dir=str(tmp_path),
        seed=3,
    )
    auto = default_params("alexnet")
    assert (cfg.dataset, cfg.data_root, cfg.checkpoint) == (auto["dataset"], auto["data_root"], auto["checkpoint"])
    assert cfg.finetune_epochs == 0.0 and cfg.targets == (2.5,) and cfg.methods == ("uniform", "policy")
    assert cfg.sensitivity_levels == (0.5, 0.2) and cfg.seed == 3
    assert log_path(cfg) == tmp_path / "alexnet" / f"alexnet-{auto['dataset']}-x2.5-s3.log"
    ft = experiment_config("resnet18", dataset="digits", checkpoint=None, finetune_epochs=0.5, targets=[2, 3])
    assert ft.finetune_epochs == 0.5 and ft.targets == (2.0, 3.0) and ft.checkpoint is None
    assert ft.dataset == "digits" and ft.data_root is None
    # FINETUNE = True is the default budget (not 1 epoch); False and 0 are off
    assert experiment_config("alexnet", finetune_epochs=True).finetune_epochs == DEFAULT_FINETUNE_EPOCHS == 3.0
    assert experiment_config("alexnet", finetune_epochs=False).finetune_epochs == 0.0
    assert experiment_config("alexnet", finetune_epochs=2).finetune_epochs == 2.0
    for bad in (-1, "3", None):
        with pytest.raises(ValueError, match="finetune"):
            experiment_config("alexnet", finetune_epochs=bad)
    with pytest.raises(TypeError):
        experiment_config("alexnet", no_such_field=1)
    with pytest.raises(TypeError):  # the config's own names only: not the old notebook spellings
        experiment_config("alexnet", finetune=1)


def test_notebook_plots_are_the_analysis_plots():
    from common import analysis
    from common.notebook import PLOTS

    assert list(PLOTS) == ["acc_vs_macs", "ranks", "sensitivity", "search_trace"]
    assert tuple(PLOTS.values()) == tuple(analysis.PLOTS)
