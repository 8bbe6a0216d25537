"""Compares the Python environment it runs in with a lock export, and can prune it to match.

Run with the environment's own interpreter, e.g. `.venv/bin/python scripts/lockenv.py
requirements/dev.txt`. It exits 0 when every requirement of the file that applies to this
platform is installed at exactly its pinned version and nothing else is installed (pip, and
the project itself where it is installed editable, excepted); otherwise it lists the
differences and exits 1. `--prune` first uninstalls what the file does not name, so that
`scripts/install` on a venv that drifted (a package added by hand, a dependency dropped from
pyproject) leaves the same set of packages as a fresh install: `pip freeze` equal.

Why not pip-sync or `uv pip sync`: pip-sync brings pip-tools' own resolver and pins, and uv
does not read the machine-local copy of the registry that pip installs torch from here, so a
fresh sync would download several GB that pip takes from disk. Installing stays pip's job;
this only reads what is installed and removes what the lock does not name.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from lock_filter import applies_here, entries, normalise  # scripts/: this file's folder

# Installed by the venv itself (pip), or the project installed editable from the work tree.
NOT_LOCKED = {"pip", "flclustering"}


def pins(path: Path) -> dict[str, str]:
    """The `name==version` pins of a pip requirements export that apply here (its entries
    as lock_filter reads them, for the Dockerfile's subsets too)."""
    found: dict[str, str] = {}
    for name, lines in entries(path.read_text())[1]:
        if not applies_here(lines[0]):
            continue
        requirement = lines[0].partition(";")[0].rstrip().removesuffix("\\").strip()
        _, sep, version = requirement.partition("==")
        if not sep:
            raise SystemExit(f"{path}: '{requirement}' is not pinned with ==")
        found[name] = version.strip()
    return found


def installed() -> dict[str, str]:
    """Every distribution importable in this interpreter, by canonical name."""
    return {
        normalise(dist.metadata["Name"]): dist.version
        for dist in metadata.distributions()
        if dist.metadata["Name"]
    }


def differences(locked: dict[str, str], present: dict[str, str]) -> tuple[list[str], list[str]]:
    """What is missing or at another version, and what is installed but not locked."""
    wrong = [
        f"{name}=={version} (installed: {present.get(name, 'missing')})"
        for name, version in sorted(locked.items())
        if present.get(name) != version
    ]
    extra = sorted(name for name in present if name not in locked and name not in NOT_LOCKED)
    return wrong, extra


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="lock exports (requirements/*.txt)")
    parser.add_argument("--prune", action="store_true", help="uninstall what they do not name")
    args = parser.parse_args(argv)
    locked: dict[str, str] = {}
    for path in args.files:
        if not path.is_file():
            parser.error(f"no such lock export: {path}")
        locked.update(pins(path))
    wrong, extra = differences(locked, installed())
    if args.prune and extra:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", *extra], check=True)
        wrong, extra = differences(locked, installed())
    for line in wrong:
        print(f"not as locked: {line}")
    for name in extra:
        print(f"installed but not locked: {name}")
    return 1 if wrong or extra else 0


if __name__ == "__main__":
    sys.exit(main())
