"""Helpers for the tests that start processes."""

from __future__ import annotations

import subprocess


def stop(proc: subprocess.Popen, sig: int, grace_s: float) -> None:
    """Send sig and give the process grace_s seconds to exit; then kill it."""
    proc.send_signal(sig)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
