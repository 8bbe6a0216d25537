"""The clusterer's durable state: a snapshot plus a write-ahead journal (no pickle).

`state.json` is the whole state at the last phase change, written durably (tmp, fsync,
rename, fsync the directory). `journal.jsonl` holds what happened since, one JSON record a
line, each flushed and fsynced before the RPC that caused it is acknowledged. Pre-training
deltas are safetensors files under `deltas/`, durable before their record is journaled.
Every record carries a sequence number and the snapshot the last one it includes, so a
crash between writing a snapshot and emptying the journal replays nothing twice; a torn
last line (a crash mid-append) is ignored. Finished rounds are appended, durably, to
`rounds.jsonl` once each, and the snapshot counts them: a snapshot costs the same in round
1,000 as in round 1 (it encoded the whole history, a quarter of the clusterer's CPU by round
30 of a default run). A line past the count (a crash between the append and the snapshot)
is dropped on load. `history.json` is a human-readable export of the same, rewritten
whole: after every round while that costs under 2% of the time since the last one, less
often past that (a run of 1,000 rounds makes it 1.3 MB, 36 ms to write), and always at the
clustering and at the end; not fsynced, since rounds.jsonl and the snapshot are the record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from services.common.files import durable_write, fsync_dir, replace_file
from services.core.errors import ConfigError

logger = logging.getLogger(__name__)

SNAPSHOT = "state.json"
JOURNAL = "journal.jsonl"
ROUNDS = "rounds.jsonl"
EXPORT = "history.json"
DELTAS = "deltas"
FORMAT = 1
EXPORT_SHARE = 0.02  # of the time between two exports that the later may cost, when it can wait


def _json(data: Any) -> str:
    """Compact JSON; numpy scalars become floats."""
    return json.dumps(data, default=float, separators=(",", ":"))


@dataclass
class Restored:
    """What load() found: the last snapshot (None: only a journal) and the records after it."""

    snapshot: dict[str, Any] | None
    events: list[dict[str, Any]] = field(default_factory=list)


class ClustererStore:
    """Snapshot, journal and delta files of one clusterer under one directory."""

    def __init__(self, directory: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = directory
        self.clock = clock
        self._exported: tuple[float, float] | None = None  # the last export's end and cost
        self.seq = 0  # the last record's sequence number
        self.synced = 0  # records up to this one are durable
        self._sync_lock = threading.Lock()
        self._journal: IO[str] | None = None

    # ---- reading back ------------------------------------------------------------------
    def load(self) -> Restored | None:
        """The snapshot and the journal records after it; None when nothing is stored."""
        snap_path = self.directory / SNAPSHOT
        try:
            snapshot = json.loads(snap_path.read_text()) if snap_path.exists() else None
        except ValueError as exc:  # written durably, so only a foreign or edited file
            raise ConfigError(f"{snap_path} is not a clusterer state: {exc}") from None
        if snapshot is not None and snapshot.get("format") != FORMAT:
            raise ConfigError(
                f"{snap_path} has format {snapshot.get('format')}, this clusterer reads {FORMAT}"
            )
        base = int(snapshot["seq"]) if snapshot else 0
        events = [e for e in self._read_journal() if int(e["seq"]) > base]
        self.seq = max([base, *(int(e["seq"]) for e in events)])
        if snapshot is None and not events:
            return None
        return Restored(snapshot, events)

    def _read_journal(self) -> list[dict[str, Any]]:
        """Every whole record of the journal; a torn or corrupt tail is dropped."""
        path = self.directory / JOURNAL
        if not path.exists():
            return []
        records: list[dict[str, Any]] = []
        lines = path.read_bytes().split(b"\n")
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                int(record["seq"])
            except (ValueError, KeyError, TypeError):
                # A torn tail (a crash mid-write), or a line a failed write left behind
                # (append truncates those, but a crash may come first): the records after
                # it carry their own sequence numbers and still count.
                logger.warning("journal line %d is torn or corrupt: ignored", i)
                continue
            records.append(record)
        records.sort(key=lambda r: int(r["seq"]))
        return records

    def load_delta(self, name: str) -> torch.Tensor:
        """A stored pre-training delta (safetensors: nothing is unpickled)."""
        from safetensors.torch import load_file

        return load_file(str(self.directory / DELTAS / name))["delta"]

    def load_rounds(self, count: int) -> list[dict[str, Any]]:
        """The first `count` finished rounds of rounds.jsonl; lines past them (appended by a
        process that died before its snapshot counted them) are cut off the file."""
        path = self.directory / ROUNDS
        data = path.read_bytes() if path.exists() else b""
        records: list[dict[str, Any]] = []
        end = 0
        for line in data.split(b"\n"):
            if len(records) == count:
                break
            try:
                records.append(json.loads(line))
            except ValueError:
                break
            end += len(line) + 1
        if len(records) < count:
            raise ConfigError(
                f"{path} holds {len(records)} finished rounds, the snapshot counts {count}: "
                "the state directory is damaged"
            )
        if end < len(data):
            with open(path, "r+b") as fh:
                fh.truncate(end)
                os.fsync(fh.fileno())
        return records

    # ---- writing -----------------------------------------------------------------------
    def append_round(self, record: dict[str, Any]) -> None:
        """Append a finished round to rounds.jsonl durably (before a snapshot counts it)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / ROUNDS
        fresh = not path.exists()
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(_json(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if fresh:
            fsync_dir(self.directory)

    def rewrite_rounds(self, records: list[dict[str, Any]]) -> None:
        """rounds.jsonl holding exactly these rounds (a snapshot of the first format kept
        its history inline)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        text = "".join(_json(r) + "\n" for r in records)
        durable_write(self.directory / ROUNDS, lambda tmp: tmp.write_text(text))

    def append(self, event: dict[str, Any]) -> int:
        """Journal one record (written and flushed to the OS); its sequence number. The
        caller makes it durable with `sync` before it acknowledges anything."""
        if self._journal is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            fresh = not (self.directory / JOURNAL).exists()
            self._journal = open(self.directory / JOURNAL, "a", encoding="utf-8")  # noqa: SIM115
            if fresh:
                fsync_dir(self.directory)
        good = self._journal.tell()
        try:
            self._journal.write(_json({**event, "seq": self.seq + 1}) + "\n")
            self._journal.flush()
        except OSError:
            # Disk full or an I/O error: drop the half-written line so the next record
            # does not land on it, and refuse this one (the caller acknowledges nothing).
            self._journal.close()
            self._journal = None
            with open(self.directory / JOURNAL, "r+b") as fh:
                fh.truncate(good)
            raise
        self.seq += 1
        return self.seq

    def sync(self, seq: int) -> None:
        """Make record `seq` and every one before it durable (group commit: one fsync
        covers every record written before it, so concurrent callers share it instead of
        queueing one fsync each behind the state's lock)."""
        if self.synced >= seq:
            return
        with self._sync_lock:
            if self.synced >= seq:
                return
            target = self.seq  # every record up to here is written and flushed
            journal = self._journal
            if journal is not None:
                os.fsync(journal.fileno())
            self.synced = max(self.synced, target)

    def save_delta(self, participant: str, delta: torch.Tensor) -> str:
        """Write a pre-training delta durably; its file name (for the journal record)."""
        from safetensors.torch import save_file

        directory = self.directory / DELTAS
        directory.mkdir(parents=True, exist_ok=True)
        tensor = delta.detach().to("cpu").contiguous()
        # Named by owner and content: two uploads racing for one task never share a file,
        # and the journal names the one that was accepted.
        digest = hashlib.sha256(participant.encode() + b"\0" + tensor.numpy().tobytes())
        name = digest.hexdigest()[:40] + ".safetensors"
        meta = {"participant": participant}
        durable_write(directory / name, lambda tmp: save_file({"delta": tensor}, str(tmp), meta))
        return name

    def save_centroids(self, centroids: dict[int, torch.Tensor]) -> str:
        """Write the clusters' centroids durably (safetensors, once per clustering, not in
        every snapshot: as JSON they were most of a snapshot's bytes and of the clusterer's
        CPU); the file's name, for the snapshot."""
        from safetensors.torch import save_file

        tensors = {f"c{c}": v.detach().to("cpu").contiguous() for c, v in centroids.items()}
        digest = hashlib.sha256()
        for name, t in sorted(tensors.items()):
            digest.update(name.encode() + b"\0" + t.numpy().tobytes())
        name = f"centroids-{digest.hexdigest()[:40]}.safetensors"
        self.directory.mkdir(parents=True, exist_ok=True)
        durable_write(self.directory / name, lambda tmp: save_file(tensors, str(tmp)))
        return name

    def load_centroids(self, name: str) -> dict[int, torch.Tensor]:
        """Centroids written by save_centroids (safetensors: nothing is unpickled)."""
        from safetensors.torch import load_file

        if not name.startswith("centroids-") or "/" in name:
            raise ConfigError(f"{name[:80]!r} is not a centroids file of this store")
        loaded = load_file(str(self.directory / name))
        return {int(k[1:]): v for k, v in loaded.items()}

    def drop_centroids(self, keep: str | None) -> None:
        """Remove centroid files the snapshot does not name."""
        for path in self.directory.glob("centroids-*.safetensors"):
            if path.name != keep:
                path.unlink(missing_ok=True)

    def snapshot(self, data: dict[str, Any]) -> None:
        """Write the whole state durably, then empty the journal it now includes."""
        self.directory.mkdir(parents=True, exist_ok=True)
        text = _json({**data, "format": FORMAT, "seq": self.seq})
        durable_write(self.directory / SNAPSHOT, lambda tmp: tmp.write_text(text))
        self.synced = max(self.synced, self.seq)  # the snapshot holds every record
        if self._journal is not None:
            self._journal.truncate(0)
            self._journal.flush()
            os.fsync(self._journal.fileno())
        elif (self.directory / JOURNAL).exists():
            with open(self.directory / JOURNAL, "r+", encoding="utf-8") as fh:
                fh.truncate(0)
                os.fsync(fh.fileno())

    def export(self, build: Callable[[], dict[str, Any]], when_due: bool = False) -> bool:
        """Write the human-readable history.json (rounds, members, clustering) from build();
        with `when_due`, only when the last export cost under EXPORT_SHARE of the time since
        it (its cost grows with the rounds; a round's own record is in rounds.jsonl).
        Whether it was written."""
        start = self.clock()
        if when_due and self._exported is not None:
            end, cost = self._exported
            if start - end < cost / EXPORT_SHARE:
                return False
        self.directory.mkdir(parents=True, exist_ok=True)
        text = json.dumps(build(), default=float)
        replace_file(self.directory / EXPORT, lambda tmp: tmp.write_text(text))
        end = self.clock()
        self._exported = (end, end - start)
        return True

    def drop_deltas(self, keep: set[str]) -> None:
        """Remove delta files no snapshot refers to (written, but never journaled)."""
        for path in (self.directory / DELTAS).glob("*.safetensors"):
            if path.name not in keep:
                path.unlink(missing_ok=True)

    def close(self) -> None:
        """Close the journal (tests; a killed process needs nothing closed)."""
        if self._journal is not None:
            self._journal.close()
            self._journal = None
