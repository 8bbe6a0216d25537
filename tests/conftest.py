"""Test tiers, so a developer can run the quick part while changing code.

- `process`: every test under tests/integration/ and tests/deploy/. They start real service
  processes or real servers on sockets, Prometheus, kubectl or linters: minutes in all.
- `slow`: a unit test that runs whole federations or trains for several seconds; marked where
  it is defined (`@pytest.mark.slow`, or `pytestmark` for a whole module).

The fast tier is `pytest -m "not slow and not process"`; `bash scripts/test` runs every tier.
The folder decides `process` (not a list to keep in step), so a new integration test cannot
slip into the fast tier.
"""

from __future__ import annotations

from pathlib import Path

import pytest

PROCESS_FOLDERS = frozenset({"integration", "deploy"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test in a process-level folder `process`."""
    for item in items:
        if PROCESS_FOLDERS & set(Path(str(item.path)).parts):
            item.add_marker(pytest.mark.process)
