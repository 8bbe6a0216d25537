"""Running checkov (installed in .venv-tools by scripts/install) over a folder of manifests."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CHECKOV = ROOT / ".venv-tools" / "bin" / "checkov"
FLAGS = ("--framework", "kubernetes", "--compact", "--quiet", "--output", "json")


def run_checkov(directory: Path) -> tuple[list[dict[str, Any]], str]:
    """checkov's reports (one per framework run) and its raw output, for failure messages."""
    assert CHECKOV.exists(), "checkov is missing from .venv-tools: run scripts/install"
    run = subprocess.run(
        [str(CHECKOV), "-d", str(directory), *FLAGS],
        capture_output=True,
        text=True,
        timeout=600,
        env={"BC_SKIP_MAPPING": "TRUE", "PATH": "/usr/bin:/bin"},
    )
    reports = json.loads(run.stdout)
    return (reports if isinstance(reports, list) else [reports]), run.stdout
