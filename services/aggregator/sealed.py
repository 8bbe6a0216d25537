"""The aggregator's state under --secure he: it adds ciphertexts it cannot read.

Version 0 is the public initial model w0 (participants start from it in the clear); every
later version is the encrypted sum of a round's `n_i * w_i` with `N = sum n_i`, which only
participants (the secret key's holders) decrypt. Rounds, reservations, replayed Aggregate
answers and durability work as in AggregatorState (this is a subclass): accepted updates
are written (safetensors of raw ciphertext bytes) before they are acknowledged, and each
new version before Aggregate is answered, so a kill -9 loses nothing.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from services.aggregator.state import (
    PENDING,
    AggregatorState,
    PendingUpdate,
    Rollback,
    RoundClose,
    RoundReport,
    _round_of,
    commit_state,
    saved_facts,
)
from services.common.codecs import CkksCodec
from services.common.files import durable_write
from services.common.homomorphic import (
    EXAMPLES,
    KEY,
    KIND,
    as_bytes,
    check_key,
    chunks,
    ciphertexts_of,
    model_tensors,
    upload_tensors,
)
from services.core.ckks import HeKeys
from services.core.errors import NotFoundError, SpecMismatchError, StateError
from services.core.tensors import unflatten


@dataclass(frozen=True)
class SealedModel:
    """An encrypted global model: the ciphertexts of sum n_i * w_i, and N."""

    ciphertexts: tuple[bytes, ...]
    examples: int


class SealedState(AggregatorState):
    """Versions 1.. are SealedModels; the robust rules and merges do not run (fedavg)."""

    def __init__(
        self, initial: OrderedDict[str, torch.Tensor], keys: HeKeys, keep_versions: int = 3
    ) -> None:
        super().__init__(initial, keep_versions)
        self.keys = keys
        self.codec = CkksCodec(keys)  # what it takes: ciphertexts of this key
        self.floats = self.store.numel
        self.sealed: OrderedDict[int, SealedModel] = OrderedDict()

    def _base(self, cluster: int) -> torch.Tensor:
        return torch.zeros(0)  # updates are whole weights, encrypted: nothing is subtracted

    def _recycle(self, updates: list[PendingUpdate]) -> None:
        pass  # ciphertexts are bytes, not the store's buffers

    def sealed_update(
        self,
        participant: str,
        cluster: int,
        samples: int,
        tensors: dict[str, torch.Tensor],
        metrics: dict[str, float] | None = None,
    ) -> PendingUpdate:
        """An encrypted upload (its header already checked by the codec), its content
        checked (`CkksCodec.ciphertexts`): this federation's key (FAILED_PRECONDITION),
        every ciphertext parsed against the public context, of its size, scale and level
        (PayloadError)."""
        ciphertexts = self.codec.ciphertexts(tensors, self.spec)
        return PendingUpdate(
            participant, cluster, samples, torch.zeros(0), dict(metrics or {}), tuple(ciphertexts)
        )

    def aggregate(self, close: RoundClose) -> RoundReport:
        """Close the open round: the sum of its ciphertexts and of its sample counts is
        the next version (asked again: the same report). Only the round and `abandon`
        count: a sum has no strategy, defence or guard to apply."""
        with self.lock:
            closing = self._closing(close.round_, close.abandon)
            if isinstance(closing, RoundReport):
                return closing
            updates = closing
            total = self.keys.add([u.ciphertexts for u in updates], self.floats)
            examples = sum(u.samples for u in updates)
            self.version += 1
            self.sealed[self.version] = SealedModel(tuple(total), examples)
            while len(self.sealed) > self.keep_versions:
                self.sealed.popitem(last=False)
            self.pending.clear()
            self.open_round += 1
            shares: dict[int, float] = {}
            for u in updates:
                shares[u.cluster] = shares.get(u.cluster, 0.0) + u.samples / examples
            self.last_report = RoundReport(self.version, len(updates), {}, shares, {}, {})
            return self.last_report

    def _kept(self) -> list[int]:
        return sorted({*self.versions, *self.sealed})

    def _copy_version(self, to_version: int) -> None:
        """A rollback: the newest version is a copy of an encrypted one, or of w0 (served
        in the clear like version 0)."""
        self.version += 1
        if to_version in self.sealed:
            self.sealed[self.version] = self.sealed[to_version]
            while len(self.sealed) > self.keep_versions:
                self.sealed.popitem(last=False)
        else:
            self.versions[self.version] = self.versions[0]
        while len(self.versions) > self.keep_versions + 1:
            self.versions.pop(next(v for v in self.versions if v != 0))

    def served(
        self, version: int = -1, cluster: int | None = None
    ) -> tuple[int, str, OrderedDict[str, torch.Tensor]]:
        """Version 0 in the clear (w0 is public; so is a rollback's copy of it), later
        versions encrypted."""
        if cluster is not None:
            raise StateError("this aggregator keeps no per-cluster models (--secure he)")
        with self.lock:
            v = self.version if version < 0 else version
            clear = v in self.versions and v not in self.sealed
            if clear:
                flat = self._flat(v)
            elif v in self.sealed:
                model = self.sealed[v]
            else:
                kept = ", ".join(map(str, [0, *self.sealed]))
                raise NotFoundError(f"model version {v} is not kept (have {kept})")
        if clear:
            return v, "weights", unflatten(flat, self.spec, self.reference, share=True)
        return v, KIND, model_tensors(self.keys, model.ciphertexts, model.examples, self.reference)

    def weights(
        self, version: int = -1, cluster: int | None = None
    ) -> tuple[int, OrderedDict[str, torch.Tensor]]:
        raise StateError("the global model is encrypted (--secure he): served() streams it")

    # ---- durability --------------------------------------------------------------------
    def persist(self, update: PendingUpdate, round_: int, directory: Path) -> Path:
        path = self._pending_path(update, round_, directory)
        tensors = upload_tensors(self.keys, update.ciphertexts)
        meta = self._pending_meta(update, round_)
        durable_write(path, lambda tmp: _save(tmp, tensors, meta))
        return path

    def save(self, directory: Path) -> None:
        """The newest version and the one before it (a rollback's target), encrypted, or
        marked as w0's copies (rebuilt from the seed), with the counters and the last
        report, durably; then the persisted updates of closed rounds go. A version's file
        is written once: the one before the newest was written when it was the newest."""
        with self.lock:
            version, open_round = self.version, self.open_round
            earlier = [v for v in {*self.sealed, *self.versions} if v < version]
            previous = max(earlier) if earlier else None
            models = {v: self.sealed.get(v) for v in (version, previous) if v is not None}
            report = None if self.last_report is None else self.last_report.to_json()
            rollback = None if self.last_rollback is None else self.last_rollback.to_json()
        directory.mkdir(parents=True, exist_ok=True)
        entries: dict[int, dict[str, Any]] = {}
        kept: list[Path] = []
        for v, model in models.items():
            if model is None:  # w0, or a rollback's copy of it: in the clear, from the seed
                entries[v] = {"version": v, "clear": True}
                continue
            path = directory / f"sealed-v{v}.safetensors"
            if v == version or not path.exists():
                tensors = model_tensors(
                    self.keys, model.ciphertexts, model.examples, self.reference
                )
                durable_write(path, partial(_save, tensors=tensors, meta={}))
            entries[v] = {"version": v, "model": path.name}
            kept.append(path)
        newest = entries[version]
        info: dict[str, Any] = {
            "version": version,
            "open_round": open_round,
            "model": newest.get("model", ""),
            "sealed": "model" in newest,
            "clear": bool(newest.get("clear")),
            "previous": None if previous is None else entries[previous],
            "report": report,
            "rollback": rollback,
        }
        commit_state(directory, info, kept)

    def _read_sealed(self, path: Path) -> SealedModel:
        """A saved encrypted version, checked against this federation's key and size."""
        tensors, _ = _load(path)
        check_key(as_bytes(tensors[KEY]), self.keys)
        cts = ciphertexts_of(tensors)
        if len(cts) != chunks(self.floats):
            raise SpecMismatchError(f"{path.name} is not a model of this size")
        return SealedModel(tuple(cts), int(tensors[EXAMPLES].reshape(-1)[0]))

    def restore(self, directory: Path) -> bool:
        """The saved versions (the newest and the one before it) and counters, and the
        open round's persisted updates, each checked again against the key (a file of
        another federation is refused)."""
        meta = directory / "state.json"
        restored = False
        if meta.exists():
            info = json.loads(meta.read_text())
            version = int(info["version"])
            entries = [{"version": version, "model": info.get("model"), "clear": info.get("clear")}]
            if info.get("previous"):
                entries.append(dict(info["previous"]))
            sealed: OrderedDict[int, SealedModel] = OrderedDict()
            clear: list[int] = []
            for e in sorted(entries, key=lambda e: int(e["version"])):
                v = int(e["version"])
                if e.get("model"):
                    sealed[v] = self._read_sealed(directory / str(e["model"]))
                elif v == 0 or e.get("clear"):
                    clear.append(v)
                else:
                    raise SpecMismatchError(f"{meta} holds a model in the clear (not --secure he)")
            done = info.get("rollback")
            with self.lock:  # version 0 is w0, rebuilt from the seed
                self.version = version
                self.open_round = int(info["open_round"])
                self.sealed = sealed
                for v in clear:
                    self.versions[v] = self.versions[0]
                report = info.get("report")
                self.last_report = None if report is None else RoundReport.from_json(report)
                self.last_rollback = None if done is None else Rollback.from_json(done)
            restored = True
        for path in sorted((directory / PENDING).glob("r*.safetensors")):
            if _round_of(path) != self.open_round:
                path.unlink(missing_ok=True)
                continue
            tensors, info = _load(path)
            sender, cluster, samples, metrics = saved_facts(info)
            update = self.sealed_update(sender, cluster, samples, tensors, metrics)
            with self.lock:
                self.pending[update.participant] = update
            restored = True
        return restored


def _save(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), meta or None)


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A sealed file's tensors and metadata (safetensors: nothing is unpickled)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (not a dict)
        return tensors, dict(fh.metadata() or {})
