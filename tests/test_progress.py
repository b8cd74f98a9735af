"""Progress and time estimates: the estimate a long step says from its first measured units, the bars a
notebook kernel keeps in their final state (papermill saves display updates, not widget states), the
heartbeat lines papermill's ``--log-output`` shows, and the whole-run estimate of a CPU run."""

from __future__ import annotations

import dataclasses
import io

import pytest

from common import progress
from common.progress import Estimate, _DisplayLine, duration_text, progress_bar


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_estimate_says_once_from_the_measured_units_not_the_warmup_nor_the_skipped():
    clock, lines = _Clock(), []
    est = Estimate("search guided x3", 100, "candidate", lines.append, warmup=1, measured=3, clock=clock)
    est.skip(10)  # read back from the log: no work, no time
    clock.t = 50.0  # the first candidate (allocation, caches) is slow and not timed
    est.step()
    for _ in range(3):
        clock.t += 2.0
        est.step()
    assert est.per_unit == pytest.approx(2.0)
    assert lines == ["search guided x3: 86 candidates × 2 s/candidate ≈ 2.9 min left"]
    for _ in range(20):
        clock.t += 5.0
        est.step()
    assert len(lines) == 1  # said once
    quiet = Estimate("x", 4, "step", None, clock=clock)
    for _ in range(4):
        quiet.step()
    assert quiet.per_unit is not None  # measured all the same
    done = []
    last = Estimate("x", 4, "point", done.append, clock=clock)
    for _ in range(4):
        last.step()
    assert done == []  # nothing left to estimate


def test_duration_text():
    assert [duration_text(s) for s in (42, 90, 3600, 7200)] == ["42 s", "1.5 min", "60.0 min", "2.0 h"]


class _Handle:
    def __init__(self, shown: list[str]):
        self.shown = shown

    def update(self, data: dict, raw: bool = False) -> None:
        assert raw
        self.shown.append(data["text/plain"])


def test_a_kernel_bar_keeps_its_final_state_and_prints_heartbeat_lines(monkeypatch):
    """In a kernel the bar is one display line updated in place (the executed notebook keeps its last
    state, ``100%``), and a long bar prints its line to stdout every HEARTBEAT_SECONDS and when it ends."""
    shown: list[str] = []
    out, clock = io.StringIO(), _Clock()

    def display(text: str) -> _Handle:
        shown.append(text)
        return _Handle(shown)

    line = _DisplayLine(display=display, out=out, heartbeat=60.0, clock=clock)
    monkeypatch.setattr(progress, "_in_kernel", lambda: True)
    monkeypatch.setattr(progress, "_DisplayLine", lambda: line)
    bar = progress_bar(5, "sensitivity seed 0", "plan")
    for _ in range(5):
        clock.t += 30.0
        bar.update()
        bar.refresh()  # as tqdm does every mininterval of real time
    bar.close()
    assert shown[0].startswith("sensitivity seed 0:") and "0/5" in shown[0]
    assert "100%" in shown[-1] and "5/5" in shown[-1]
    beats = out.getvalue().splitlines()
    assert len(beats) == 3 and "100%" in beats[-1] and all(b.startswith("sensitivity seed 0:") for b in beats)
    assert "2/5" in beats[0] and "4/5" in beats[1]  # at 60 s and 120 s, then the end at 150 s
    # a short bar stays quiet on stdout: its final state is in the notebook
    short = _DisplayLine(display=display, out=(quiet := io.StringIO()), heartbeat=60.0, clock=_Clock())
    monkeypatch.setattr(progress, "_DisplayLine", lambda: short)
    with progress_bar(2, "eval val") as b:
        b.update(2)
    assert quiet.getvalue() == "" and "100%" in short.text
    # nested bars (an evaluation inside finetuning) draw each on a line of its own, without cursor moves
    lines = iter([_DisplayLine(display=display, out=out, clock=clock) for _ in range(2)])
    monkeypatch.setattr(progress, "_DisplayLine", lambda: next(lines))
    shown.clear()
    with progress_bar(2, "finetune", "step") as outer:
        with progress_bar(3, "finetune: val", "batch") as inner:
            inner.update(3)
        outer.update(2)
    assert shown and not any("\x1b" in t or "\n" in t for t in shown), shown
    assert any(t.startswith("finetune: val:") and "3/3" in t for t in shown)


def test_outside_a_kernel_bars_are_tqdm_and_off_is_a_no_op():
    from tqdm.std import tqdm

    bar = progress_bar(3, "eval", "batch")
    assert isinstance(bar, tqdm) and not bar.leave
    bar.close()
    off = progress_bar(3, None)
    off.update()
    off.close()


def test_a_search_says_how_long_its_candidates_will_take(digits):
    from tests.test_search import make

    lines: list[str] = []
    s = make(digits, progress=lines.append)
    s.run("random", 3.0, "macs", n_candidates=6, seed=0)
    (line,) = [x for x in lines if "≈" in x]
    assert line.startswith("search random x3: ") and " candidates × " in line and "s/candidate" in line
    s.sensitivity()
    assert any(x.startswith("sensitivity") and " points × " in x for x in lines), lines


def test_the_whole_run_estimate_counts_every_stage_and_names_what_shrinks_it(digits):
    from common.run.config import ExperimentConfig
    from common.run.estimate import image_passes, run_estimate_text

    cfg = ExperimentConfig(
        dataset="digits", methods=("guided", "uniform"), search_budget=10, calib_images=100, val_images=200
    )
    passes = image_passes(cfg, digits, n_layers=20)
    # baseline: val + test; the guided search's profile: dense + 20 layers x 1 shape x 3 levels points,
    # each a candidate scored on the 100 calibration images
    assert passes["baseline"] == len(digits.val) + len(digits.test)
    assert passes["sensitivity"] == (1 + 20 * len(cfg.shapes) * len(cfg.sensitivity_levels)) * 100
    # guided: 10 candidates and 3 re-ranked on 200 val images; uniform: one candidate
    assert passes["searches"] == 10 * 100 + 3 * (100 + 200) + 100
    assert passes["finals"] == 2 * (cfg.final_calib_images + len(digits.val) + len(digits.test))
    assert passes["finetuning"] == 0
    tuned = image_passes(dataclasses.replace(cfg, finetune_epochs=1.0), digits, 20)["finetuning"]
    assert tuned == 2 * (len(digits.train) * 4 + 2 * len(digits.val) + len(digits.test))
    text = run_estimate_text(cfg, digits, 20, per_image=0.01)
    total = sum(passes.values()) * 0.01
    assert text.startswith(f"estimate: this run takes roughly {duration_text(total)} on this CPU")
    for option in ("--search-budget", "--calib-images", "--val-images", "--finetune-epochs", "--device cuda"):
        assert option in text


def test_a_cifar_sized_cpu_run_says_its_estimate_up_front(digits, digits_checkpoint, tmp_path, monkeypatch):
    """The estimate comes before the baseline's evaluation, in the log as a comment; on digits (1,078
    train images) only when the threshold is lowered, as here."""
    from common.run import estimate
    from common.run.config import ExperimentConfig
    from common.run.experiment import run_experiment
    from common.run.logs import parse_log

    monkeypatch.setattr(estimate, "LARGE_TRAIN_IMAGES", 1000)
    cfg = ExperimentConfig(
        model="alexnet",
        dataset="digits",
        checkpoint=str(digits_checkpoint("alexnet", fit=False)),
        methods=("uniform",),
        final_calib_images=64,
        log_dir=str(tmp_path / "logs"),
        run_id="est",
        progress=False,
        artifacts=False,
        device="cpu",
    )
    run_experiment(cfg)
    text = (tmp_path / "logs" / "alexnet" / "est.log").read_text()
    assert "# estimate: this run takes roughly" in text and "To shrink it: --search-budget" in text
    assert text.index("# estimate:") < text.index(" baseline ")
    records, errors = parse_log(tmp_path / "logs" / "alexnet" / "est.log")
    assert errors == [] and records[-1]["kind"] == "end"
