"""CountSketch: a sparse random projection of long vectors to a few thousand coordinates.

Each input coordinate goes to one random output coordinate with a random sign, so pairwise
distances are kept in expectation at O(d) cost per vector. The hash depends only on the
seed and the input length: a participant sketching its own pre-training delta and the
clusterer sketching the same delta get the same vector, so participants of a large model
send 8 KB for clustering instead of the whole delta (docs/algorithm.md, section 3).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

SKETCH_ABOVE = 4096  # vectors longer than this are clustered as sketches
SKETCH_DIM = 2048  # coordinates of a sketch
BLOCK = 1 << 22  # elements per block of rows sketched at once


def row_blocks(n: int, width: int, elements: int = BLOCK) -> Iterator[slice]:
    """Slices of rows whose blocks hold about `elements` values of `width` each."""
    step = max(1, elements // max(width, 1))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def count_sketch(x: torch.Tensor, dim: int, seed: int = 0, chunk: int = 1 << 20) -> torch.Tensor:
    """Project rows of x to `dim` coordinates (float32).

    The hash is generated chunk by chunk from the seed (so it depends on d alone, never on
    how many rows are sketched at once) and applied to blocks of rows, so memory stays
    O(n * dim + chunk) whatever n.
    """
    n, d = x.shape
    out = torch.zeros(n, dim, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, d, chunk):
        stop = min(d, start + chunk)
        bucket = torch.randint(0, dim, (stop - start,), generator=gen)
        sign = torch.randint(0, 2, (stop - start,), generator=gen).float().mul_(2).sub_(1)
        for rows in row_blocks(n, stop - start):
            out[rows].index_add_(1, bucket, x[rows, start:stop].float().cpu() * sign)
    return out
