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
from torch.utils.data import DataLoader
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


class LoaderExamples:
    """Examples read from a torch Dataset (files on disk) by a DataLoader with workers.

    The order of an epoch is drawn from the caller's generator, as for tensors, so a
    participant's run is reproducible; the workers only read and transform. Memory holds a
    few batches per worker (prefetch), never the dataset.
    """

    def __init__(self, dataset: TorchDataset, workers: int = 2, prefetch: int = 2) -> None:
        self.dataset = dataset
        self.workers = workers
        self.prefetch = prefetch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def batches(
        self,
        batch_size: int,
        device: torch.device,
        generator: torch.Generator | None = None,
    ) -> Iterator[Batch]:
        n = len(self)
        order = torch.randperm(n, generator=generator) if generator is not None else None
        loader = DataLoader(
            self.dataset,
            batch_size=batch_size,
            sampler=order.tolist() if order is not None else None,
            num_workers=self.workers,
            prefetch_factor=self.prefetch if self.workers else None,
            pin_memory=device.type == "cuda",
            # Each worker is seeded from the epoch's order: augmentation is reproducible.
            generator=torch.Generator().manual_seed(
                int(order[0]) if n and order is not None else 0
            ),
        )
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
