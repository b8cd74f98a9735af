"""The READMEs' relative links resolve, and results/README.md lists every results folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from analyze_results import tracked_files

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
    tracked = tracked_files(REPO / "results")
    if not tracked:
        pytest.skip("needs a git checkout to tell tracked folders from scratch ones")
    folders = {Path(f).parts[1] for f in tracked if len(Path(f).parts) > 2}
    index = (REPO / "results" / "README.md").read_text()
    listed = set(re.findall(r"\[`([^`/]+)/`\]", index))
    assert folders - listed == set(), f"results/README.md does not list {sorted(folders - listed)}"
    assert listed - folders == set(), f"results/README.md lists folders git does not track: {sorted(listed - folders)}"
