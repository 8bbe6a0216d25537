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


# glibc's mallopt parameters, and the environment variables by which an operator sets them
# instead (then left as they are).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
MALLOC_SETTINGS = (
    (M_ARENA_MAX, "MALLOC_ARENA_MAX", "glibc.malloc.arena_max", 2),
    (M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold", 8 << 20),
    (M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold", 16 << 20),
)


def tune_malloc() -> list[str]:
    """Set glibc's malloc for a service that moves models through gRPC; call it before the
    process's threads exist. Returns the settings made (none where libc is not glibc, and
    none that the environment already sets: MALLOC_* variables or GLIBC_TUNABLES).

    - Two arenas: glibc gives threads that allocate at the same time arenas of their own,
      up to 8 per core, and memory freed in one is not returned while anything in it
      lives: a gRPC server whose pool threads take turns with hostile calls grew by
      60-115 MiB over 3,000 of them (tests/integration/test_fuzz.py), the spread set by
      nothing but timing. Two is the common setting for threaded Python servers.
    - Buffers under 8 MiB (every gRPC message: the cap is 4 MiB) from the heap, and the
      heap's free top returned to the kernel only past 16 MiB. With glibc's defaults each
      2 MiB message was mmap'ed or trimmed off the heap when freed and its pages faulted in
      again, zeroed, for the next: receiving 10 MB cost 11-16 ms of CPU instead of 4-5
      (page faults and madvise were the largest items in `perf`), a third of a round's
      CPU in `benchmarks/round.py`. Model-sized buffers are still mmap'ed and given back
      when freed; what the heap keeps is bounded by 16 MiB per arena.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return []
    made = []
    for param, variable, tunable, value in MALLOC_SETTINGS:
        if variable in os.environ or tunable in tunables:
            continue
        if mallopt(param, value):
            made.append(f"{tunable}={value}")
    return made
