"""Files that survive a crash: what a service acknowledges is on disk first."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def durable_write(path: Path, write: Callable[[Path], object]) -> None:
    """write(tmp), fsync it, rename it over path, fsync the directory: a crash leaves the
    old file or the new one, never a torn one. Each call writes its own temporary file, so
    two writers of one path never share one."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    write(tmp)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in directory durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
