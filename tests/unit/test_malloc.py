"""Services tune glibc's malloc at start, and leave alone what an operator set."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SHOW = "from services.common.lifecycle import tune_malloc; print(','.join(tune_malloc()))"


def settings_made(**env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if "MALLOC" not in k and k != "GLIBC_TUNABLES"}
    out = subprocess.run(
        [sys.executable, "-c", SHOW], env=clean | env, capture_output=True, text=True, check=True
    ).stdout.strip()
    return out.split(",") if out else []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux's")
def test_tune_malloc_sets_arenas_and_thresholds_unless_the_environment_does():
    assert settings_made() == [
        "glibc.malloc.arena_max=2",
        f"glibc.malloc.mmap_threshold={8 << 20}",
        f"glibc.malloc.trim_threshold={16 << 20}",
    ]
    assert settings_made(MALLOC_ARENA_MAX="4") == [
        f"glibc.malloc.mmap_threshold={8 << 20}",
        f"glibc.malloc.trim_threshold={16 << 20}",
    ]
    assert settings_made(GLIBC_TUNABLES="glibc.malloc.trim_threshold=1000") == [
        "glibc.malloc.arena_max=2",
        f"glibc.malloc.mmap_threshold={8 << 20}",
    ]
