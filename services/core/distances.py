"""Squared distances between rows from one Gram-matrix product: what Krum, the near-twin
screen and the clustering all read pairwise distances from (no loop over pairs)."""

from __future__ import annotations

import torch


def gram_of(x: torch.Tensor) -> torch.Tensor:
    """x @ x.T: every dot product between rows, in one matrix product."""
    return x @ x.T


def distances_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """All squared Euclidean distances between rows, from their Gram matrix.

    |a|^2 + |b|^2 - 2ab with the norms read off the diagonal, so exact duplicates get a
    distance of exactly 0, and clamped at 0 against rounding.
    """
    sq = gram.diagonal()
    d = sq[:, None] + sq[None, :] - 2.0 * gram
    d.clamp_(min=0.0)
    d.fill_diagonal_(0.0)
    return d
