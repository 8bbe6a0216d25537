"""A participant's examples, in memory or on disk, as one thing the training loop reads.

Shards of a named dataset are tensors in memory (a simulation holds the whole dataset
anyway), and reading them by index keeps every run bit-identical to the project's earlier
ones. A data owner's images need not fit in memory: they are read from disk in batches by a
torch DataLoader with worker processes (one set of them for all a participant's images),
in an order drawn from the same seeded generator.
Either way the loop sees mini-batches (x, y) and the number of examples.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch
from torch.utils.data import ConcatDataset, DataLoader, Sampler
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

    def to(self, device: torch.device) -> TensorExamples:
        """The same examples on device (moved once, not at every pass)."""
        return TensorExamples(self.x.to(device), self.y.to(device))

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


class _Passes(Sampler[list[int]]):
    """The batches of the next pass, set by the caller before each: the DataLoader (and its
    worker processes) outlive passes, the order and the batch size are the pass's own. The
    order is kept as a tensor (8 bytes an example, where a list of Python ints costs 36)
    and cut into batches as the DataLoader asks for them."""

    def __init__(self) -> None:
        self.order = torch.empty(0, dtype=torch.int64)
        self.size = 1

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(0, len(self.order), self.size):
            yield self.order[start : start + self.size].tolist()

    def __len__(self) -> int:
        return -(-len(self.order) // self.size)


class Readers:
    """The worker processes that read examples from disk, shared by every LoaderExamples
    built on them (a participant's training and test images, every batch size).

    One DataLoader per device type over their datasets side by side (ConcatDataset): a
    pass sends the workers batches of indices, offset to the dataset it reads, in batches of
    the pass's size. Workers are forked from the participant, and each one's resident set
    counts the participant's anonymous pages it shares (about 0.3 GB once torch is
    imported), so a DataLoader per dataset and batch size (the training images, the test
    images at the evaluation's batch size, the training images again for a loss before
    training: 4 to 6 workers for --loader-workers 2) made a participant's process tree
    2.1 GB in resident memory over a folder it never holds; shared, `workers` is all the
    readers it has: 1.4 GB (benchmarks/data_memory.py).

    Datasets are added before the first pass: the workers start with the datasets they
    were given. One pass at a time: a pass started while another is being read ends that
    one (its next batch raises RuntimeError rather than handing over the new pass's).
    """

    def __init__(self, workers: int = 2, prefetch: int = 2) -> None:
        self.workers = workers
        self.prefetch = prefetch
        self.datasets: list[TorchDataset] = []
        self._loaders: dict[str, tuple[DataLoader, _Passes]] = {}
        self._pass = 0
        self._size = 0

    def add(self, dataset: TorchDataset) -> int:
        """Read dataset too; its first index among all the datasets."""
        if self._loaders:
            raise RuntimeError("a dataset added after the workers started: they would lack it")
        offset = self._size
        self._size += len(dataset)  # type: ignore[arg-type]
        self.datasets.append(dataset)
        return offset

    def _loader(self, device: torch.device) -> tuple[DataLoader, _Passes]:
        if device.type not in self._loaders:
            passes = _Passes()
            everything: ConcatDataset[Batch] = ConcatDataset(self.datasets)
            loader = DataLoader(
                everything,
                batch_sampler=passes,
                num_workers=self.workers,
                prefetch_factor=self.prefetch if self.workers else None,
                persistent_workers=self.workers > 0,
                pin_memory=device.type == "cuda",
                generator=torch.Generator().manual_seed(len(everything)),
            )
            self._loaders[device.type] = (loader, passes)
        return self._loaders[device.type]

    def read(self, order: torch.Tensor, batch_size: int, device: torch.device) -> Iterator[Batch]:
        """Batches of batch_size examples at the indices order (in all the datasets), in
        that order, on device."""
        loader, passes = self._loader(device)
        self._pass += 1
        mine = self._pass
        passes.order, passes.size = order, batch_size
        for x, y in loader:
            self._check(mine)
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        self._check(mine)  # an iterator another pass ran to its end stops early: not silently

    def _check(self, mine: int) -> None:
        if self._pass != mine:
            raise RuntimeError("another pass over these readers started before this one ended")

    def close(self) -> None:
        """Stop the workers now (they would stop when this is collected)."""
        for loader, _ in self._loaders.values():
            running = getattr(loader, "_iterator", None)
            if running is not None and hasattr(running, "_shutdown_workers"):
                running._shutdown_workers()
            loader._iterator = None
        self._loaders.clear()


class LoaderExamples:
    """Examples read from a torch Dataset (files on disk) by worker processes (Readers).

    The order of an epoch is drawn from the caller's generator, as for tensors, so a
    participant's run is reproducible; the workers only read and transform. Memory holds a
    few batches per worker (prefetch), never the dataset. The workers are started once and
    kept (persistent): starting them every epoch would cost a process start per worker per
    epoch. Examples built on the same readers share their workers.
    """

    def __init__(
        self,
        dataset: TorchDataset,
        workers: int = 2,
        prefetch: int = 2,
        readers: Readers | None = None,
    ) -> None:
        self.dataset = dataset
        self.readers = readers if readers is not None else Readers(workers, prefetch)
        self.offset = self.readers.add(dataset)

    @property
    def workers(self) -> int:
        """The processes that read these examples (shared with the readers' others)."""
        return self.readers.workers

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def batches(
        self,
        batch_size: int,
        device: torch.device,
        generator: torch.Generator | None = None,
    ) -> Iterator[Batch]:
        n = len(self)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        yield from self.readers.read(order + self.offset, batch_size, device)
