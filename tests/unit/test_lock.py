"""The lock: uv.lock agrees with pyproject.toml, the exports agree with uv.lock, and the
environment the suite runs in is exactly what the lock pins.

These fail when a dependency is added to (or dropped from, or re-ranged in) pyproject.toml
without `scripts/lock`, when requirements/*.txt is edited by hand, and when an install
resolved anything afresh. The check of pyproject against the lock may ask the registry (uv
re-resolves to say what differs), which CI reaches.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UV = Path(sys.executable).parent / "uv"
EXPORTS = {
    # export file: (project folder, uv export's selection flags), as scripts/lock writes them
    "runtime.txt": (ROOT, ["--group", "build"]),
    "dev.txt": (ROOT, ["--group", "build", "--extra", "dev"]),
    "tools.txt": (ROOT / "tools" / "checkov", []),
}


def uv(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Runs the locked uv; its cache stays in the test's environment, not the user's home."""
    assert UV.is_file(), f"uv is not installed beside {sys.executable}: run scripts/install --dev"
    return subprocess.run(
        [str(UV), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "UV_NO_PROGRESS": "1"},
    )


@pytest.mark.parametrize("project", [ROOT, ROOT / "tools" / "checkov"], ids=["project", "tools"])
def test_lock_agrees_with_pyproject(project: Path) -> None:
    result = uv("lock", "--check", "--project", str(project))
    assert result.returncode == 0, result.stderr


def test_a_dependency_added_to_pyproject_alone_fails_the_check(tmp_path: Path) -> None:
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    shutil.copy(ROOT / "uv.lock", tmp_path)
    pyproject = tmp_path / "pyproject.toml"
    text = pyproject.read_text()
    assert '    "opacus>=1.5",\n' in text
    pyproject.write_text(
        text.replace('    "opacus>=1.5",\n', '    "opacus>=1.5",\n    "rich>=13",\n')
    )
    result = uv("lock", "--check", "--project", str(tmp_path))
    assert result.returncode != 0
    assert "rich" in result.stderr, result.stderr


def test_a_range_changed_in_pyproject_alone_fails_the_check(tmp_path: Path) -> None:
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    shutil.copy(ROOT / "uv.lock", tmp_path)
    pyproject = tmp_path / "pyproject.toml"
    text = pyproject.read_text()
    pyproject.write_text(text.replace('"numpy>=1.26"', '"numpy>=1.26,<2"'))
    result = uv("lock", "--check", "--project", str(tmp_path))
    assert result.returncode != 0
    assert "numpy" in result.stderr, result.stderr


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_export_is_what_the_lock_says(name: str, tmp_path: Path) -> None:
    project, flags = EXPORTS[name]
    out = tmp_path / name
    result = uv(
        "export",
        "--frozen",
        "--format",
        "requirements-txt",
        "--no-emit-project",
        "--no-default-groups",
        *flags,
        "--project",
        str(project),
        "-o",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    # The header names the command that wrote it; the pins and hashes must match exactly.
    body = [line for line in out.read_text().splitlines() if not line.startswith("#")]
    committed = (ROOT / "requirements" / name).read_text().splitlines()
    assert [line for line in committed if not line.startswith("#")] == body, (
        f"requirements/{name} differs from uv.lock: run scripts/lock"
    )


def test_every_export_pins_with_hashes() -> None:
    for name in EXPORTS:
        text = (ROOT / "requirements" / name).read_text()
        entries = re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", text, flags=re.M)
        assert len(entries) > 10, name
        # every pinned entry is followed by at least one sha256 before the next entry
        for block in re.split(r"^(?=[A-Za-z0-9_.\-]+==)", text, flags=re.M)[1:]:
            assert "--hash=sha256:" in block, f"{name}: {block.splitlines()[0]} has no hash"
    runtime = (ROOT / "requirements" / "runtime.txt").read_text()
    assert re.search(r"^torch==2\.14\.1 ", runtime, flags=re.M)
    assert re.search(r"^torchvision==0\.29\.1 ", runtime, flags=re.M)


def test_this_environment_is_exactly_the_lock() -> None:
    """The suite's own .venv: what scripts/install made from requirements/dev.txt, nothing
    resolved afresh and nothing left over (a fresh machine's `pip freeze` is the same)."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "lockenv.py"),
            str(ROOT / "requirements" / "dev.txt"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_lockenv_names_a_package_at_another_version(tmp_path: Path) -> None:
    """The comparison itself can fail: a lock that pins pytest at another version."""
    import pytest as installed_pytest

    fake = tmp_path / "lock.txt"
    fake.write_text(
        "pytest==0.0.1 \\\n    --hash=sha256:" + "0" * 64 + "\n"
        "not-for-this-platform==1.0 ; sys_platform == 'nonesuch' \\\n"
        f"    --hash=sha256:{'1' * 64}\n"
    )
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "lockenv.py"), str(fake)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert (
        f"not as locked: pytest==0.0.1 (installed: {installed_pytest.__version__})" in result.stdout
    )
    assert "not-for-this-platform" not in result.stdout
    assert "installed but not locked: numpy" in result.stdout
