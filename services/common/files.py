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
    replace_file(path, write, durable=True)


def replace_file(path: Path, write: Callable[[Path], object], durable: bool = False) -> None:
    """write(tmp) and rename it over path: a killed process leaves the old file or the new
    one, never a torn one. Without `durable` nothing is fsynced, so a power cut may lose
    the newest version: enough for exports that a durable record can rebuild."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    write(tmp)
    if durable:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    tmp.replace(path)
    if durable:
        fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in directory durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
