"""Near-twin rows: updates that honest participants never send but colluders do.

Honest participants train on their own data with their own seeds, so no two of their
deltas coincide; attackers who all send one crafted delta (ALIE, IPM, Min-Max, Min-Sum, a
steered pre-training delta) are at distance 0 from each other. Used by the aggregator's
defence (over a round's Gram matrix) and by the clustering (over pre-training deltas).
"""

from __future__ import annotations

import math

import torch

from services.core.distances import distances_from_gram


def twins(gram: torch.Tensor, factor: float) -> torch.Tensor:
    """Mask of rows with a near-twin: another row closer than `factor` times the median
    distance between two rows (distances from the Gram matrix, no pass over the rows).

    The upper median: when half the pairs are identical copies, the lower one is 0 and
    would switch the screen off. Needs three rows (with two there is no median to compare
    against) and a non-zero median distance (all rows alike: nothing to tell apart).
    """
    n = gram.shape[0]
    out = torch.zeros(n, dtype=torch.bool, device=gram.device)
    if n < 3:
        return out
    d2 = distances_from_gram(gram.double())
    off = ~torch.eye(n, dtype=torch.bool, device=gram.device)
    pairs = d2[off].sort().values
    med = float(pairs[pairs.numel() // 2])
    if med <= 0.0 or not math.isfinite(med):
        return out
    nearest = d2.masked_fill(~off, math.inf).min(dim=1).values
    return nearest <= factor * factor * med
