"""Where a round's deltas and the older model versions live: memory within a budget, files
beyond it.

With no budget everything stays in memory. With `--memory-budget-mb` the aggregator counts
what it holds: the current model and the one an aggregation builds (two model copies),
the working blocks of the aggregation, and the deltas of the open round kept in memory;
a delta that would not fit is received straight into a file (the base model subtracted
chunk by chunk as it arrives), and versions other than the current one (w0, older ones)
move to files. Files are written and read with plain pwrite/preadv, not memory-mapped: the
pages of a mapped file count in the process's resident memory, the page cache does not.
Aggregation reads the rows back as column blocks (`StoredRows`), so a round's deltas are
never all in memory at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.common.wire import Sink
from services.core.errors import ConfigError, SpecMismatchError

MB = 1 << 20
BLOCK_BYTES = 16 * MB  # one column block of all the round's rows
# A block, a copy of a cluster's rows, their sorted values and int64 sort indices (median,
# trimmed mean: two blocks), a device copy.
WORKING_BLOCKS = 6
IO_BYTES = 1 << 30  # Linux moves at most ~2 GiB per read or write call
COPY_BYTES = 16 * MB


@dataclass(frozen=True)
class DiskRow:
    """A delta of `numel` float32 values in a file, from byte `offset` (little-endian)."""

    path: Path
    offset: int
    numel: int
    owned: bool = True  # the store's own file (deleted with the row), not a persisted one

    def read(self, start: int, out: np.ndarray) -> None:
        """Fill `out` (float32) with the values from element `start` on."""
        view = out.data.cast("B")
        done = 0
        with open(self.path, "rb", buffering=0) as fh:
            while done < len(view):
                piece = view[done : done + IO_BYTES]
                got = os.preadv(fh.fileno(), [piece], self.offset + 4 * start + done)
                if got <= 0:
                    raise SpecMismatchError(f"{self.path} ends before the delta it should hold")
                done += got

    def load(self) -> torch.Tensor:
        """The whole row in memory."""
        out = np.empty(self.numel, dtype=np.float32)
        self.read(0, out)
        return torch.from_numpy(out)

    def drop(self) -> None:
        """Delete the file if it is the store's own."""
        if self.owned:
            self.path.unlink(missing_ok=True)


Delta = torch.Tensor | DiskRow


class RowFile:
    """A delta being received into a file: `write(first, values)` per chunk."""

    def __init__(self, path: Path, numel: int) -> None:
        self.row = DiskRow(path, 0, numel)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, 4 * numel)

    def write(self, first: int, values: np.ndarray) -> None:
        """Store float32 values at element `first` (all of them, or OSError: disk full)."""
        view = np.ascontiguousarray(values).data.cast("B")
        done = 0
        while done < len(view):
            wrote = os.pwrite(self._fd, view[done : done + IO_BYTES], 4 * first + done)
            if wrote <= 0:
                raise OSError(f"could not write {self.row.path}")
            done += wrote

    def close(self) -> DiskRow:
        """The row, complete (the file is closed; it stays until the row is dropped)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        return self.row


class DeltaStore:
    """Hands out places for incoming deltas and keeps model versions, within a budget."""

    def __init__(
        self,
        numel: int,
        budget_mb: int | None = None,
        directory: Path | None = None,
        block_bytes: int = BLOCK_BYTES,
    ) -> None:
        self.numel = numel
        self.block_bytes = block_bytes
        self.budget = None if budget_mb is None else budget_mb * MB
        model = 4 * numel
        self._row_ram = None  # bytes of deltas that may stay in memory; None: no limit
        if self.budget is not None:
            fixed = 2 * model + WORKING_BLOCKS * block_bytes
            if self.budget < fixed:
                raise ConfigError(
                    f"a memory budget of {budget_mb:,} MB is below what a round of this model "
                    f"needs: {-(-fixed // MB):,} MB (the current and the next model, "
                    f"{model / MB:,.0f} MB each, and {WORKING_BLOCKS * block_bytes // MB} MB "
                    "of working blocks)"
                )
            self._row_ram = self.budget - fixed
        self._dir = directory
        self._own_dir = directory is None
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            for old in (*directory.glob("delta-*.f32"), *directory.glob("version-*.f32")):
                old.unlink(missing_ok=True)  # a previous run's; nothing else is touched
        self._lock = threading.Lock()
        self._in_ram = 0  # bytes of delta buffers alive (in rounds, in flight, or spare)
        self._spare: list[torch.Tensor] = []
        self._keep = 0  # spare buffers worth keeping: as many as the last round used
        self._block: torch.Tensor | None = None  # the column-block buffer between uses

    @property
    def directory(self) -> Path:
        """Where files go (a temporary directory is made the first time one is needed)."""
        with self._lock:
            if self._dir is None:
                self._dir = Path(tempfile.mkdtemp(prefix="flclustering-aggregator-"))
            return self._dir

    @property
    def limited(self) -> bool:
        """Whether a budget applies (versions other than the current one go to files)."""
        return self.budget is not None

    def place(self) -> torch.Tensor | RowFile:
        """Where the next delta goes: a buffer in memory (a previous round's, whose pages are
        mapped already: a fresh one costs a page fault per 4 KiB) or, past the budget, a
        file."""
        size = 4 * self.numel
        with self._lock:
            if self._spare:
                return self._spare.pop()
            if self._row_ram is None or self._in_ram + size <= self._row_ram:
                self._in_ram += size
                return torch.empty(self.numel, dtype=torch.float32)
        return RowFile(self.directory / f"delta-{uuid.uuid4().hex}.f32", self.numel)

    def release(self, deltas: Sequence[Delta | Sink], round_closed: bool = False) -> None:
        """Deltas no longer needed: files are deleted, buffers kept for the next round (as
        many as the last closed round used; a burst of refused uploads leaves no more)."""
        with self._lock:
            if round_closed:
                self._keep = sum(isinstance(d, torch.Tensor) for d in deltas)
            for d in deltas:
                if isinstance(d, RowFile):
                    d.close().drop()
                elif isinstance(d, DiskRow):
                    d.drop()
                elif isinstance(d, torch.Tensor) and d.numel() == self.numel:
                    self._spare.append(d)
            while len(self._spare) > self._keep:
                self._spare.pop()
                self._in_ram = max(0, self._in_ram - 4 * self.numel)

    def adopt(self, row: DiskRow) -> Delta:
        """A delta read back after a restart: into memory if it fits, else read in place."""
        buffer = self.place()
        if isinstance(buffer, RowFile):
            buffer.close().drop()
            return row
        row.read(0, buffer.numpy())
        return buffer

    def stash(self, version: int, flat: torch.Tensor) -> DiskRow:
        """Write a model version to a file (it leaves memory when the caller drops it)."""
        path = self.directory / f"version-{version}.f32"
        sink = RowFile(path, flat.numel())
        try:
            array = flat.numpy()
            step = COPY_BYTES // 4
            for start in range(0, array.size, step):
                sink.write(start, array[start : start + step])
        except BaseException:
            sink.close().drop()
            raise
        return sink.close()

    def rows(self, deltas: Sequence[Delta], device: torch.device) -> StoredRows:
        """The deltas as rows read in column blocks of at most `block_bytes`."""
        return StoredRows(list(deltas), self.numel, device, self.block_bytes, self)

    @contextlib.contextmanager
    def block_buffer(self, numel: int) -> Iterator[torch.Tensor]:
        """A buffer of `numel` floats to assemble column blocks in: the previous pass's,
        whose pages are mapped already. A round makes two or three passes over its rows and
        a fresh 16 MB buffer costs 4,096 page faults each time (`perf` counted 12,000 a
        round in the aggregator of benchmarks/round.py, most of them here). Passes that
        overlap get a buffer each; one is kept between them (within the working blocks the
        budget counts)."""
        with self._lock:
            buffer, self._block = self._block, None
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=torch.float32)
        try:
            yield buffer[:numel]
        finally:
            with self._lock:
                if self._block is None or self._block.numel() < buffer.numel():
                    self._block = buffer

    def close(self) -> None:
        """Remove a temporary directory of the store's own."""
        if self._own_dir and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


class StoredRows:
    """Rows in memory and in files, assembled into column blocks (`rows.Rows`)."""

    def __init__(
        self,
        deltas: list[Delta],
        numel: int,
        device: torch.device,
        block_bytes: int,
        store: DeltaStore | None = None,
    ) -> None:
        self.deltas = deltas
        self.numel = numel
        self._device = device
        self.width = max(1, block_bytes // (4 * max(1, len(deltas))))
        self._store = store

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.deltas), self.numel

    @property
    def device(self) -> torch.device:
        return self._device

    def blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        n = len(self.deltas)
        numel = n * min(self.width, self.numel)
        with (
            self._store.block_buffer(numel)
            if self._store is not None
            else contextlib.nullcontext(torch.empty(numel, dtype=torch.float32))
        ) as buffer:
            for start in range(0, self.numel, self.width):
                w = min(self.width, self.numel - start)
                block = buffer[: n * w].view(n, w)
                for i, d in enumerate(self.deltas):
                    if isinstance(d, DiskRow):
                        d.read(start, block[i].numpy())
                    else:
                        block[i].copy_(d.narrow(0, start, w))
                yield start, block.to(self._device, non_blocking=True)


def safetensors_row(path: Path, name: str = "delta") -> DiskRow:
    """The row of one float32 vector tensor in a safetensors file, read in place (its
    header is JSON: nothing is unpickled)."""
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        if size > 100 * MB:
            raise SpecMismatchError(f"{path}: header of {size:,} bytes")
        header = json.loads(fh.read(size))
    info = header.get(name)
    if not isinstance(info, dict) or info.get("dtype") != "F32" or len(info.get("shape", [])) != 1:
        raise SpecMismatchError(f"{path} does not hold a float32 vector {name!r}")
    begin, end = info["data_offsets"]
    numel = int(info["shape"][0])
    if end - begin != 4 * numel:
        raise SpecMismatchError(f"{path}: {name!r} has {end - begin} bytes for {numel} values")
    return DiskRow(path, 8 + size + begin, numel, owned=False)


_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(
    path: Path, tensors: Mapping[str, Delta], metadata: dict[str, str] | None = None
) -> None:
    """Write tensors (a row in a file counts as a float32 vector) in the safetensors format,
    streaming each one's bytes: `safetensors.torch.save_file` would first copy them all."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        if isinstance(t, DiskRow):
            dtype, shape, size = "F32", [t.numel], 4 * t.numel
        else:
            dtype, shape, size = _DTYPES[t.dtype], list(t.shape), t.numel() * t.element_size()
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(text)))
        out.write(text)
        for t in tensors.values():
            if isinstance(t, DiskRow):
                piece = np.empty(max(1, min(t.numel, COPY_BYTES // 4)), dtype=np.float32)
                for start in range(0, t.numel, piece.size):
                    part = piece[: min(piece.size, t.numel - start)]
                    t.read(start, part)
                    out.write(part.data.cast("B"))
            elif t.numel():
                raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                out.write(raw.data)
