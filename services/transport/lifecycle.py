"""Children that do not outlive their launcher.

`flclustering simulate` hands each child the read end of a pipe whose write end only the
launcher holds (FLCLUSTERING_PARENT_FD). However the launcher ends, SIGKILL included, the
kernel closes the write end; the child reads end-of-file and sends itself SIGTERM, so it
shuts down as it would on `kubectl delete` (NOT_SERVING, grace period, exit). A pipe
rather than Linux's parent-death signal: it works on every platform and needs no code to
run between fork and exec.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import signal
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

PARENT_FD_ENV = "FLCLUSTERING_PARENT_FD"


def exit_with_parent() -> None:
    """If launched with a parent pipe, SIGTERM this process when the launcher is gone."""
    raw = os.environ.get(PARENT_FD_ENV)
    if not raw:
        return
    try:
        fd = int(raw)
        os.fstat(fd)
    except (ValueError, OSError):
        logger.warning("%s=%r is not an open file descriptor; ignored", PARENT_FD_ENV, raw)
        return

    def watch() -> None:
        try:
            while os.read(fd, 1):
                pass
        except OSError:
            pass
        logger.warning("the launching process is gone: shutting down")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class ParentPipe:
    """The launcher's side: the pipe every child watches (close it to stop them all)."""

    def __init__(self) -> None:
        self.read_fd, self._write_fd = os.pipe()  # neither is inherited unless passed

    def child_env(self) -> dict[str, str]:
        """The variable telling a child which descriptor to watch."""
        return {PARENT_FD_ENV: str(self.read_fd)}

    def close(self) -> None:
        """Close both ends (the children then shut down)."""
        for fd in (self.read_fd, self._write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def memory_bytes(pid: int | str, field: str = "VmHWM") -> int | None:
    """A /proc/PID/status memory field in bytes (VmHWM: the peak resident set, VmRSS: now);
    None once the process is gone. Launchers and benchmarks report what processes cost."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def freeze_heap() -> None:
    """Exempt everything alive now (imported modules: torch alone brings hundreds of
    thousands of objects) from the cyclic garbage collector, and collect the rest less often.

    Every collection walks its generation while holding the GIL. In a clusterer with torch
    imported and 10,000 members (their pending polls keep promoting objects), full
    collections came every second or two and stalled every call, health checks included,
    for 0.1-0.7 s, growing with the heap. Frozen, with a young generation of 10,000 objects
    instead of 700 and full collections only after 10,000 young ones, the longest pause
    measured was 0.16 s and health checks answered within 0.1 s at the 99th percentile
    (`benchmarks/load.py`). Called once a service is built.
    """
    gc.freeze()
    gc.set_threshold(10_000, 10, 1000)


M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas for this process, unless MALLOC_ARENA_MAX says otherwise.

    glibc gives threads that allocate at the same time arenas of their own, up to 8 per
    core, and memory freed in one is not returned while anything in it lives: a gRPC server
    whose pool threads take turns with hostile calls grew by 60-115 MiB over 3,000 of them
    (tests/integration/test_fuzz.py), the spread set by nothing but timing. Two arenas is
    the common setting for threaded Python servers (one GIL runs Python anyway; big buffers
    are mmap'ed outside the arenas). Returns whether the cap was set (not glibc: no cap).
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False
