"""The documentation stays true: its code runs, its links resolve, nothing points outside.

mkdocs build --strict (in scripts/test) checks the links between the site's pages; these
tests check what it does not: the README's links, the Python the pages show, and that no
file of the repository names a document the repository does not hold.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted((ROOT / "docs").glob("*.md"))
SNIPPET = re.compile(r"```python\n(.*?)```", re.S)
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def tracked() -> list[Path]:
    """The repository's text files as a clone has them."""
    out = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    keep = (".py", ".md", ".yml", ".yaml", ".toml", ".proto", ".json", "")
    return [ROOT / p for p in out.split() if Path(p).suffix in keep and (ROOT / p).is_file()]


def test_the_readme_is_short_and_opens_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move detail into docs/"
    assert lines[2:6] == [
        "```bash",
        "bash scripts/install && .venv/bin/flclustering simulate",
        "bash scripts/test",
        "```",
    ]


def test_the_readmes_links_resolve_inside_the_repository():
    text = (ROOT / "README.md").read_text()
    local = [t for t in LINK.findall(text) if "://" not in t]
    assert local, "the README links its documentation"
    for target in local:
        path = (ROOT / target).resolve()
        assert path.is_relative_to(ROOT), f"README links outside the repository: {target}"
        assert path.exists(), f"README links a missing file: {target}"


def test_no_file_points_outside_the_repository():
    outside = re.compile(r"\.\./shared|ALGORITHM\.md|shared/seeds")
    found = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in tracked()
        if p.name != "test_docs.py"
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if outside.search(line)
    ]
    assert not found, f"these name documents the repository does not hold: {found}"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_the_python_a_page_shows_runs(page: Path):
    for snippet in SNIPPET.findall(page.read_text()):
        exec(compile(snippet, str(page), "exec"), {})
