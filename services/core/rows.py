"""A round's deltas as rows that the aggregation reads in column blocks.

Every step of a round's aggregation needs either the n x n Gram matrix of the deltas (the
norm screen, Krum, cluster norms of linear rules, q-FFL's step size) or one pass over the
coordinates (the weighted row sums of the merge, median and trimmed mean, which are
coordinate-wise). So the round reads its deltas as column blocks: a matrix in memory is
one block (views, no copy), and the aggregator's store (`store.py`) assembles blocks from
rows in memory and rows in files, so that a round larger than memory never is in memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


class Rows(Protocol):
    """n rows of d float32 values, read as (n, b) column blocks on `device`."""

    @property
    def shape(self) -> tuple[int, int]: ...

    @property
    def device(self) -> torch.device: ...

    def blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(first column, block) for consecutive column blocks covering all d columns. A
        block may be reused for the next one: use it before asking for the next."""
        ...


@dataclass(frozen=True)
class MatrixRows:
    """Rows of a matrix in memory: blocks of `width` columns (all of them by default)."""

    matrix: torch.Tensor
    width: int | None = None

    @property
    def shape(self) -> tuple[int, int]:
        n, d = self.matrix.shape
        return int(n), int(d)

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    def blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        d = self.matrix.shape[1]
        width = max(1, self.width or d)
        for start in range(0, d, width):
            yield start, self.matrix.narrow(1, start, min(width, d - start))


def take(block: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """The given rows of a block: a view when they are consecutive, else a copy."""
    if list(rows) == list(range(rows[0], rows[0] + len(rows))):
        return block.narrow(0, rows[0], len(rows))
    return block.index_select(0, torch.tensor(list(rows), device=block.device))


@dataclass(frozen=True)
class Scan:
    """What one pass over the rows gives: their Gram matrix and which rows are all finite."""

    gram: torch.Tensor  # (n, n) float32; rows that are not finite have NaN/Inf entries
    finite: torch.Tensor  # (n,) bool


def scan(rows: Rows) -> Scan:
    """One pass: the Gram matrix accumulated block by block; each row's finiteness from it.

    A row's squared norm (its diagonal entry) is finite when all its entries are: an Inf or
    NaN entry makes it Inf or NaN. It can also overflow with finite entries (|x| > 1.8e19),
    so only rows whose norm is not finite are read again, entry by entry (a second pass,
    which rounds of finite updates never take: the aggregator has checked every value).
    """
    n, _ = rows.shape
    gram = torch.zeros(n, n, dtype=torch.float32, device=rows.device)
    for _, block in rows.blocks():
        gram.addmm_(block, block.T)
    finite = torch.isfinite(gram.diagonal()).clone()
    suspects = torch.nonzero(~finite).flatten().tolist()
    if suspects:
        finite[suspects] = True
        for _, block in rows.blocks():
            for i in suspects:
                if not bool(torch.isfinite(block[i]).all()):
                    finite[i] = False
    return Scan(gram, finite)
