"""A participant's examples, in memory or on disk, as one thing the training loop reads.

Shards of a named dataset are tensors in memory (a simulation holds the whole dataset
anyway), and reading them by index keeps every run bit-identical to the project's earlier
ones. A data owner's images need not fit in memory: they are read from disk in batches by a
torch DataLoader with worker processes, in an order drawn from the same seeded generator.
Either way the loop sees mini-batches (x, y) and the number of examples.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data import Dataset as TorchDataset

Batch = tuple[torch.Tensor, torch.Tensor]


def index_batches(
    n: int, batch_size: int, generator: torch.Generator, drop_last: bool = False
) -> Iterator[torch.Tensor]:
    """Shuffled index batches over n examples (one epoch)."""
    perm = torch.randperm(n, generator=generator)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        yield perm[start : start + batch_size]


class Examples(Protocol):
    """Labelled examples the training loop reads in mini-batches."""

    def __len__(self) -> int: ...

    def batches(
        self,
        batch_size: int,
        device: torch.device,
        generator: torch.Generator | None = None,
    ) -> Iterator[Batch]:
        """One epoch of (x, y) on device: shuffled by generator, in order without one."""
        ...


class TensorExamples:
    """Examples held as tensors (N, ...) and labels (N,)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if len(x) != len(y):
            raise ValueError(f"{len(x)} inputs but {len(y)} labels")
        self.x = x
        self.y = y

    def __len__(self) -> int:
        return len(self.y)

    def batches(
        self,
        batch_size: int,
        device: torch.device,
        generator: torch.Generator | None = None,
    ) -> Iterator[Batch]:
        x, y = self.x.to(device), self.y.to(device)
        if generator is None:
            for start in range(0, len(y), batch_size):
                yield x[start : start + batch_size], y[start : start + batch_size]
            return
        for idx in index_batches(len(y), batch_size, generator):
            idx = idx.to(device)
            yield x[idx], y[idx]


class _Order(Sampler[int]):
    """The order of the next epoch, set by the caller before each pass: the DataLoader (and
    its worker processes) outlive epochs, the order is drawn anew for each."""

    def __init__(self) -> None:
        self.order: list[int] = []

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


class LoaderExamples:
    """Examples read from a torch Dataset (files on disk) by a DataLoader with workers.

    The order of an epoch is drawn from the caller's generator, as for tensors, so a
    participant's run is reproducible; the workers only read and transform. Memory holds a
    few batches per worker (prefetch), never the dataset. The workers are started once per
    batch size and kept (persistent): starting them every epoch would cost a process start
    per worker per epoch.
    """

    def __init__(self, dataset: TorchDataset, workers: int = 2, prefetch: int = 2) -> None:
        self.dataset = dataset
        self.workers = workers
        self.prefetch = prefetch
        self._loaders: dict[tuple[int, str], tuple[DataLoader, _Order]] = {}

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def _loader(self, batch_size: int, device: torch.device) -> tuple[DataLoader, _Order]:
        key = (batch_size, device.type)
        if key not in self._loaders:
            order = _Order()
            loader = DataLoader(
                self.dataset,
                batch_size=batch_size,
                sampler=order,
                num_workers=self.workers,
                prefetch_factor=self.prefetch if self.workers else None,
                persistent_workers=self.workers > 0,
                pin_memory=device.type == "cuda",
                generator=torch.Generator().manual_seed(len(self)),
            )
            self._loaders[key] = (loader, order)
        return self._loaders[key]

    def batches(
        self,
        batch_size: int,
        device: torch.device,
        generator: torch.Generator | None = None,
    ) -> Iterator[Batch]:
        loader, order = self._loader(batch_size, device)
        n = len(self)
        order.order = (
            torch.randperm(n, generator=generator).tolist()
            if generator is not None
            else list(range(n))
        )
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
