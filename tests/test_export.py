"""Tests for common.deploy.export: ONNX export of compressed models, its check and ONNX Runtime verification,
ONNX Runtime timing, and the ``python -m common.deploy.export`` command line on a saved artifact."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from common.decompose.layers import FactorizedConv
from common.decompose.surgery import LayerPlan, apply_plan, list_conv_layers
from common.deploy import export as export_mod
from common.deploy.export import ExportError, export_onnx, ort_latency, ort_session

pytestmark = pytest.mark.one_thread
REPO = Path(__file__).resolve().parents[1]
RTOL = 1e-4


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """The check export_onnx makes: max |a - b| relative to max |b|."""
    return float(np.abs(a - b).max() / np.abs(b).max())


def _small_compressed() -> nn.Module:
    """A small CNN with an HT-2 layer (stride 2), a Tucker-2 layer and an SVD 1×1, seeded weights."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, (3, 5), padding=(1, 2)),
        nn.ReLU(),
        nn.Conv2d(32, 24, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(24, 10),
    )
    with torch.no_grad():  # non-trivial BN statistics, so that a BN left in train mode would show
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    names = [i.name for i in list_conv_layers(model, (1, 3, 16, 16))]
    plan = {
        names[1]: LayerPlan("ht2", (8, 16, 8)),
        names[2]: LayerPlan("tucker2", (16, 8)),
        names[3]: LayerPlan("svd", (8,)),
    }
    return apply_plan(model, plan).eval()


def _torch_out(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return model.eval()(x).numpy()


def _x(shape, seed: int = 3) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_export_writes_checked_verified_onnx_with_dynamic_batch(tmp_path):
    model = _small_compressed()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()  # export must use eval mode and give the caller's mode back
    out = tmp_path / "sub" / "small.onnx"
    r = export_onnx(model, (2, 3, 16, 16), out, metadata={"mean": [0.5, 0.5, 0.5], "model": "small"})
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert out.is_file() and r["path"] == str(out) and r["bytes"] == out.stat().st_size > 0
    assert not r["external_data"] and r["deployment"] is None and r["dynamic_batch"]
    assert r["max_rel_error"] is not None and 0 <= r["max_rel_error"] <= RTOL
    onnx.checker.check_model(str(out), full_check=True)
    m = onnx.load(str(out))
    assert r["opset"] == next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 18
    assert {p.key: p.value for p in m.metadata_props} == {"mean": "[0.5, 0.5, 0.5]", "model": "small"}
    # the factor convs are exported as they are: 4 (HT-2) + 3 (Tucker-2) + 2 (SVD) + the dense stem
    assert sum(n.op_type == "Conv" for n in m.graph.node) == 1 + 4 + 3 + 2
    session = ort_session(out, threads=1)
    for batch in (1, 2, 5):  # 5: another batch than the exported one, through the dynamic dimension
        x = _x((batch, 3, 16, 16), seed=batch)
        got = session.run(None, {"input": x.numpy()})[0]
        assert got.shape == (batch, 10)
        assert _rel(got, _torch_out(model, x)) <= RTOL


def test_export_deployed_matches_and_reports_the_partitions(tmp_path):
    model = _small_compressed()
    factorized = [n for n, m in model.named_modules() if isinstance(m, FactorizedConv)]
    out = tmp_path / "deployed.onnx"
    opts = {"threads": 1, "warmup": 0, "iters": 1}
    r = export_onnx(model, (2, 3, 16, 16), out, deployed=True, deploy_options=opts)
    assert [d["name"] for d in r["deployment"]] == factorized
    assert r["max_rel_error"] <= RTOL
    n_convs = sum(n.op_type == "Conv" for n in onnx.load(str(out)).graph.node)
    assert n_convs == 1 + sum(len(d["form"]) for d in r["deployment"])
    x = _x((7, 3, 16, 16))
    assert _rel(ort_session(out, 1).run(None, {"input": x.numpy()})[0], _torch_out(model, x)) <= RTOL
    # the fewest-MAC partitions (no timing) are exact as well
    r_macs = export_onnx(model, (1, 3, 16, 16), out, deployed=True, deploy_options={"choose": "macs"})
    assert r_macs["max_rel_error"] <= RTOL
    assert len(r_macs["deployment"]) == len(factorized)


def test_export_of_a_compressed_resnet18_matches(tmp_path):
    from tests.helpers import fast_model

    plan = {
        "layer1.0.conv1": LayerPlan("ht2", (8, 8, 8)),
        "layer2.0.conv2": LayerPlan("tucker2", (16, 16)),
        "layer2.0.downsample.0": LayerPlan("svd", (16,)),
    }
    model = apply_plan(fast_model("resnet18"), plan)
    r = export_onnx(model, (2, 3, 32, 32), tmp_path / "r18.onnx")
    assert r["max_rel_error"] <= RTOL and r["dynamic_batch"]
    x = _x((3, 3, 32, 32))
    got = ort_session(tmp_path / "r18.onnx", 1).run(None, {"input": x.numpy()})[0]
    assert _rel(got, _torch_out(model, x)) <= RTOL


def test_export_refuses_a_wrong_runtime_output_naming_the_file(tmp_path, monkeypatch):
    model = _small_compressed()
    real = export_mod._ort_run
    monkeypatch.setattr(export_mod, "_ort_run", lambda s, x: real(s, x) * 1.01)  # a 1 % error
    out = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match=r"bad\.onnx.*differs from PyTorch") as e:
        export_onnx(model, (2, 3, 16, 16), out)
    assert "rtol 0.0001" in str(e.value)
    assert not out.exists()  # no unverified file left behind
    r = export_onnx(model, (2, 3, 16, 16), out, verify=False)  # without verification it is written
    assert out.is_file() and r["max_rel_error"] is None


def test_export_rejects_a_bad_input_shape(tmp_path):
    with pytest.raises(ValueError, match="B x C x H x W"):
        export_onnx(_small_compressed(), (3, 16, 16), tmp_path / "x.onnx")


def test_ort_latency_dict_and_session_reuse(tmp_path):
    out = tmp_path / "m.onnx"
    export_onnx(_small_compressed(), (2, 3, 16, 16), out, verify=False)
    r = ort_latency(out, (4, 3, 16, 16), threads=1, warmup=1, iters=5)
    assert r["iters"] == 5 and r["batch"] == 4 and r["threads"] == 1 and r["device"] == "cpu"
    assert r["runtime"].startswith("onnxruntime ")
    assert 0 < r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] < 10_000
    session = ort_session(out, threads=1)
    assert ort_latency(session, (1, 3, 16, 16), warmup=0, iters=2)["threads"] == 1
    with pytest.raises(ValueError, match="intra-op threads"):
        ort_latency(session, (1, 3, 16, 16), threads=2, iters=1)
    with pytest.raises(ValueError, match="iters"):
        ort_latency(session, (1, 3, 16, 16), iters=0)


def _artifacts():
    if importlib.util.find_spec("common.deploy.artifacts") is None:
        pytest.skip("common.deploy.artifacts is not importable yet (the artifact format lands with it)")
    import common.deploy.artifacts as artifacts

    return artifacts


def test_cli_round_trip_on_a_saved_artifact(tmp_path, capsys):
    artifacts = _artifacts()
    from tests.helpers import fast_model

    plan = {"layer1.0.conv1": LayerPlan("ht2", (8, 8, 8)), "layer3.0.conv2": LayerPlan("ht2", (16, 16, 16))}
    model = apply_plan(fast_model("resnet18"), plan)
    path = tmp_path / "a.pt"
    artifacts.save_artifact(
        path, model, plan, base_model="resnet18", num_classes=10, input_size=32, mean=(0.5,) * 3, std=(0.25,) * 3
    )
    out = tmp_path / "a.onnx"
    assert export_mod.main([str(path), "--onnx", str(out), "--deployed", "--batch", "2", "--threads", "1"]) == 0
    assert "wrote" in capsys.readouterr().out
    m = onnx.load(str(out))
    props = {p.key: p.value for p in m.metadata_props}
    assert props["model"] == "resnet18" and props["input_size"] == "32" and props["deployed"] == "true"
    x = _x((3, 3, 32, 32))
    got = ort_session(out, 1).run(None, {"input": x.numpy()})[0]
    assert _rel(got, _torch_out(artifacts.load_compressed(path), x)) <= RTOL
    assert _rel(got, _torch_out(model, x)) <= RTOL  # and the artifact holds the very model saved


def test_cli_bad_artifact_exits_2_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a torch file")
    assert export_mod.main([str(bad), "--onnx", str(tmp_path / "g.onnx")]) == 2
    err = capsys.readouterr().err
    assert "garbage.pt" in err and err.startswith("error: cannot load artifact")
    assert not (tmp_path / "g.onnx").exists()


def test_cli_missing_artifact_exits_2_naming_the_file(tmp_path):
    missing = tmp_path / "nowhere" / "model.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "common.deploy.export", str(missing), "--onnx", str(tmp_path / "m.onnx")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert f"artifact not found: {missing}" in proc.stderr


def test_ort_session_spinning_follows_the_openmp_wait_policy(tmp_path, monkeypatch):
    out = tmp_path / "m.onnx"
    export_onnx(_small_compressed(), (2, 3, 16, 16), out, verify=False)

    def spin(session) -> str:
        return session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert spin(ort_session(out, 1)) == "0" and spin(ort_session(out, 1, spinning=True)) == "1"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert spin(ort_session(out, 1)) == "1" and spin(ort_session(out, 1, spinning=False)) == "0"


def test_ort_interleaved_latency_ratios_and_reference(tmp_path):
    torch.manual_seed(0)
    small = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    big = nn.Sequential(*[nn.Conv2d(c, 64, 3, padding=1) for c in (3, 64, 64)], nn.AdaptiveAvgPool2d(1), nn.Flatten())
    for name, m in (("small", small), ("big", big)):
        export_onnx(m.eval(), (2, 3, 32, 32), tmp_path / f"{name}.onnx", verify=False)
    files = {k: tmp_path / f"{k}.onnx" for k in ("big", "small")}
    r = export_mod.ort_interleaved_latency(files, (1, 3, 32, 32), rounds=3, warmup=1, iters=3, reference="big")
    assert len(r["big"]["rounds_ms"]) == 3 and len(r["small"]["rounds_ms"]) == 3
    assert r["small"]["median_ms"] == pytest.approx(float(np.median(r["small"]["rounds_ms"])))
    assert r["speedup"]["small"] > 3  # ~1000x fewer MACs
    assert "big" not in r["speedup"]
    with pytest.raises(ValueError, match="reference"):
        export_mod.ort_interleaved_latency(files, (1, 3, 8, 8), rounds=1, reference="huge")
    with pytest.raises(ValueError, match="rounds"):
        export_mod.ort_interleaved_latency(files, (1, 3, 8, 8), rounds=0)


def test_benchmark_rule_plans_meet_the_target_without_data():
    """The 224×224 rows' plans (benchmarks/latency.py): data-free uniform and energy plans on the budget."""
    from benchmarks.latency import rule_plans
    from common.search.space import SearchSpace
    from tests.helpers import fast_model

    model = fast_model("resnet18")
    plans = rule_plans(model, 32, [3.0], ["uniform", "energy"])
    assert set(plans) == {("uniform", "ht2", 3.0, 0), ("energy", "ht2", 3.0, 0)}
    space = SearchSpace(list_conv_layers(model, (1, 3, 32, 32)), "ht2")
    for plan in plans.values():
        assert abs(space.factor(plan, "macs") / 3.0 - 1) <= 0.03
        assert any(lp.method == "ht2" for lp in plan.values())
    assert plans[("uniform", "ht2", 3.0, 0)] != plans[("energy", "ht2", 3.0, 0)]
    with pytest.raises(ValueError, match="data-free"):
        rule_plans(model, 32, [3.0], ["policy"])


def test_benchmark_ort_columns_and_rows_without_them_measured_again(tmp_path):
    """benchmarks/latency.py with ONNX Runtime: a row first measured without ORT timings is measured again
    (one row per key left), and the ORT columns hold verified exports' timings."""
    import pandas as pd

    from benchmarks import latency as bench
    from common.models import build_model
    from common.run.documents import jsonify
    from common.run.logs import RunLog

    torch.manual_seed(0)
    layers = list_conv_layers(build_model("alexnet"), (1, 3, 32, 32))
    plan = {layers[1].name: {"method": "ht2", "ranks": [16, 16, 16]}}
    log = RunLog(tmp_path / "logs", "alexnet", "bench")
    log.write("plan", method="uniform", target=3.0, metric="macs", decomposition="ht2", seed=0, plan=plan)
    jsonify(log.path, tmp_path / "json")
    argv = ["--json", str(tmp_path / "json"), "--out", str(tmp_path / "out"), "--device", "cpu", "--threads", "1"]
    argv += ["--batches", "1", "--weights", "random", "--iters", "2", "--warmup", "0", "--deploy-iters", "1"]
    argv += ["--rounds", "1"]
    first = bench.main([*argv, "--no-ort"])
    assert len(first) == 1 and first["ort_speedup"].isna().all()
    df = bench.main([*argv, "--ort"])
    csv = pd.read_csv(tmp_path / "out" / "latency_cpu.csv")
    assert len(df) == 1 and len(csv) == 1 and list(csv.columns) == bench.ROW_COLUMNS
    row = df.iloc[0]
    assert row["ort_dense_ms"] > 0 and row["ort_factorized_ms"] > 0 and row["ort_deployed_ms"] > 0
    assert row["ort_speedup"] == pytest.approx(row["ort_dense_ms"] / row["ort_deployed_ms"], rel=1e-9)  # one round
    assert 0 <= row["ort_max_rel_error"] <= RTOL and row["onnxruntime"] == __import__("onnxruntime").__version__
    assert row["input_size"] == 32 and row["command"].endswith("--ort")
    md = (tmp_path / "out" / "latency_cpu.md").read_text()
    assert "| ort_speedup |" in md and "speedup_best" in md and "onnxruntime " in md
    assert "224×224" in md and "Not measured (`--imagenet`)" in md
    assert not list((tmp_path / "out").glob("*.onnx"))  # the exports lived in a temporary folder
