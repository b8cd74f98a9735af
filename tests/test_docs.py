"""The READMEs' relative links resolve, and results/README.md lists every results folder."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _relative_links(md: Path) -> list[str]:
    links = [t.split("#")[0] for t in LINK.findall(md.read_text())]
    return [t for t in links if t and not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("md", ["README.md", "results/README.md"])
def test_relative_links_resolve(md):
    path = REPO / md
    missing = [t for t in _relative_links(path) if not (path.parent / t).exists()]
    assert not missing, f"{md} links to missing paths: {missing}"


def test_results_index_lists_every_folder():
    """Every tracked results folder (git-ignored scratch runs such as results/digits/ aside)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to tell tracked folders from scratch ones")
    tracked = subprocess.run(["git", "ls-files", "results"], cwd=REPO, capture_output=True, text=True, check=True)
    folders = {Path(f).parts[1] for f in tracked.stdout.splitlines() if len(Path(f).parts) > 2}
    index = (REPO / "results" / "README.md").read_text()
    listed = set(re.findall(r"\[`([^`/]+)/`\]", index))
    assert folders - listed == set(), f"results/README.md does not list {sorted(folders - listed)}"
    assert listed - folders == set(), f"results/README.md lists folders git does not track: {sorted(listed - folders)}"
