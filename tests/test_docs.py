"""The documentation holds: links resolve, the README's flags exist, its generated block is current, every
results folder is indexed and named by a doc, and the README stays user documentation (short)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from analyze_results import tracked_files
from common.analysis import README_BEGIN, README_END, readme_block

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")
README_LINES = 450

ENTRY_POINTS = {
    "common.run": [sys.executable, "-m", "common.run", "--help"],
    "common.deploy.export": [sys.executable, "-m", "common.deploy.export", "--help"],
    "finetuned.train_baseline": [sys.executable, "-m", "finetuned.train_baseline", "--help"],
    "jsonify_logs.py": [sys.executable, "jsonify_logs.py", "--help"],
    "analyze_results.py": [sys.executable, "analyze_results.py", "--help"],
    **{
        f"benchmarks/{p.name}": [sys.executable, f"benchmarks/{p.name}", "--help"]
        for p in sorted((REPO / "benchmarks").glob("*.py"))
        if not p.name.startswith("_")
    },
}
"""The commands whose ``--help`` the README's flags are checked against."""

OTHER_TOOLS_FLAGS = {
    # torchrun's, in the README's multi-GPU lines
    "--standalone",
    "--nproc-per-node",
    "--nnodes",
    "--rdzv-backend",
    "--rdzv-endpoint",
    "--rdzv-id",
    # papermill's, in the notebook example
    "--log-output",
    # pip's, in the install line
    "--no-deps",
    "--no-build-isolation",
}


def _docs() -> list[Path]:
    return [
        REPO / "README.md",
        REPO / "CHANGELOG.md",
        *sorted((REPO / "docs").glob("*.md")),
        *sorted((REPO / "results").glob("README.md")),
        *sorted((REPO / "studies").rglob("README.md")),
        REPO / "finetuned" / "README.md",
    ]


def _relative_links(md: Path) -> list[str]:
    links = [t.split("#")[0] for t in LINK.findall(md.read_text())]
    return [t for t in links if t and not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("md", [p.relative_to(REPO).as_posix() for p in _docs()])
def test_relative_links_resolve(md):
    path = REPO / md
    missing = [t for t in _relative_links(path) if not (path.parent / t).exists()]
    assert not missing, f"{md} links to missing paths: {missing}"


def test_readme_is_short():
    n = len((REPO / "README.md").read_text().splitlines())
    assert n <= README_LINES, f"README.md has {n} lines: studies and findings belong in docs/, results in the block"


def test_readme_block_is_current():
    """The block between the README's markers is what ``analyze_results.py --readme`` writes now."""
    text = (REPO / "README.md").read_text()
    shown = text.split(README_BEGIN + "\n", 1)[1].split(README_END, 1)[0]
    assert shown == readme_block(REPO / "results"), (
        "README.md's results block is stale: run `python analyze_results.py --readme README.md --overwrite-committed`"
    )


@pytest.mark.slow
def test_readme_flags_exist():
    """Every ``--flag`` the README names is an option of one of its entry points (or of torchrun / pip)."""
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", (REPO / "README.md").read_text()))
    helps = ""
    for name, cmd in ENTRY_POINTS.items():
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{name} --help failed: {done.stderr[-500:]}"
        helps += done.stdout
    known = set(re.findall(r"(--[a-z][a-z0-9-]*)", helps)) | OTHER_TOOLS_FLAGS
    assert named - known == set(), f"README.md names flags no entry point has: {sorted(named - known)}"


def test_results_index_lists_every_folder():
    """Every tracked results folder (git-ignored scratch runs such as results/digits/ aside)."""
    tracked = tracked_files(REPO / "results")
    if not tracked:
        pytest.skip("needs a git checkout to tell tracked folders from scratch ones")
    folders = {Path(f).parts[1] for f in tracked if len(Path(f).parts) > 2}
    index = (REPO / "results" / "README.md").read_text()
    listed = set(re.findall(r"\[`([^`/]+)/`\]", index))
    assert folders - listed == set(), f"results/README.md does not list {sorted(folders - listed)}"
    assert listed - folders == set(), f"results/README.md lists folders git does not track: {sorted(listed - folders)}"


def test_every_results_folder_has_a_doc():
    """Nothing is lost: each results folder is named by at least one file of docs/."""
    tracked = tracked_files(REPO / "results")
    if not tracked:
        pytest.skip("needs a git checkout to tell tracked folders from scratch ones")
    folders = {Path(f).parts[1] for f in tracked if len(Path(f).parts) > 2}
    docs = "\n".join(p.read_text() for p in (REPO / "docs").glob("*.md"))
    unnamed = {f for f in folders if f"results/{f}/" not in docs and f"results/{f})" not in docs}
    assert not unnamed, f"results folders no doc names: {sorted(unnamed)}"


def _makefile_run_args() -> list[str]:
    """``RUN_ARGS`` of the Makefile (what ``make run`` passes to ``python -m common.run``), as arguments."""
    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    (line,) = [x for x in text.splitlines() if x.startswith("RUN_ARGS ?=")]
    return line.split("?=", 1)[1].split()


def test_the_readme_model_snippet_runs_from_any_folder(tmp_path, digits_checkpoint):
    """The "Use the compressed model" snippet names the file ``make run`` writes (the path derived here
    from the Makefile's options and the code that names artifacts, not copied) and runs as written from
    another folder, on an artifact of a tiny digits run put in that file's place."""
    from common.deploy.artifacts import artifact_name
    from common.run.config import ExperimentConfig
    from common.run.experiment import parse_args, run_experiment

    make_run = parse_args(_makefile_run_args())
    method, target = make_run.methods[0], make_run.targets[0]
    written = make_run.artifact_folder() / artifact_name(method, target, "ht2", make_run.finetune_epochs > 0)
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Use the compressed model", 1)[1].split("\n## ", 1)[0]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    literal = f'"{written.as_posix()}"'
    assert literal in snippet, f"the README snippet should name {literal}, what `make run` writes"

    cfg = ExperimentConfig(
        model="alexnet",
        dataset="digits",
        checkpoint=str(digits_checkpoint("alexnet", fit=False)),
        methods=("uniform",),
        final_calib_images=64,
        finetune_epochs=0.05,
        log_dir=str(tmp_path / "logs"),
        run_id="snippet",
        progress=False,
        device="cpu",
    )
    (final,) = run_experiment(cfg)
    artifact = final["artifacts"]["ft"]["path"]
    script = tmp_path / "snippet.py"
    script.write_text(snippet.replace(literal, repr(str(Path(artifact).resolve()))))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ) | {"PYTHONPATH": str(REPO)}  # as the editable install of `make venv` would
    done = subprocess.run([sys.executable, str(script)], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("tensor([") and len(done.stdout.split(",")) == 8, done.stdout
