"""Robust aggregation rules over an (n, d) matrix of updates (ALGORITHM.md section 5).

Each rule returns the aggregate and which inputs it kept or rejected. All pairwise distances
come from one Gram-matrix product; nothing loops over pairs or layers in Python. A rule whose
precondition fails takes the documented fallback and reports it in `fallback`; it never falls
back silently.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from services.common.errors import ConfigError, PreconditionError
from services.common.registry import Registry


@dataclass(frozen=True)
class AggregateResult:
    """An aggregate, the inputs it rests on, and any fallback that was taken."""

    aggregate: torch.Tensor
    rule: str
    kept: tuple[int, ...]
    rejected: tuple[int, ...]
    scores: tuple[float, ...] = field(default=())
    fallback: str | None = None


def pairwise_sq_distances(x: torch.Tensor) -> torch.Tensor:
    """All squared Euclidean distances between rows of x, by one Gram-matrix product.

    |a|^2 + |b|^2 - 2ab with the norms read off the Gram diagonal, so exact duplicates get a
    distance of exactly 0, and clamped at 0 against rounding.
    """
    gram = x @ x.T
    sq = gram.diagonal()
    d = sq[:, None] + sq[None, :] - 2.0 * gram
    d.clamp_(min=0.0)
    d.fill_diagonal_(0.0)
    return d


def krum_scores(dist: torch.Tensor, f: int) -> torch.Tensor:
    """Krum score of each row: sum of squared distances to its n - f - 2 nearest others."""
    n = dist.shape[0]
    m = n - f - 2
    if m < 1:
        raise PreconditionError(f"Krum needs n > 2f + 2; got n={n}, f={f}")
    masked = dist + torch.diag(torch.full((n,), math.inf, dtype=dist.dtype, device=dist.device))
    nearest = masked.topk(m, dim=1, largest=False).values
    return nearest.sum(dim=1)


def _check(x: torch.Tensor, f: int) -> None:
    if x.dim() != 2 or x.shape[0] == 0:
        raise ConfigError(f"updates must be a non-empty (n, d) matrix, got shape {tuple(x.shape)}")
    if f < 0:
        raise ConfigError(f"number of attackers f must be >= 0, got {f}")


def krum_precondition(n: int, f: int) -> bool:
    """Whether Krum's guarantee holds: n > 2f + 2."""
    return n > 2 * f + 2


def _median_fallback(x: torch.Tensor, rule: str, reason: str) -> AggregateResult:
    med = coordinate_median(x)
    return AggregateResult(
        med.aggregate, rule, med.kept, med.rejected, fallback=f"median: {reason}"
    )


def multi_krum(
    x: torch.Tensor, f: int, m: int | None = None, fallback: bool = True
) -> AggregateResult:
    """Multi-Krum: the mean of the m updates with the lowest Krum scores (m = n - f default).

    With m = 1 this is Krum. Ties go to the lower index. Below n > 2f + 2 the coordinate-wise
    median is returned instead (reported), or PreconditionError raised if fallback is off.
    """
    _check(x, f)
    n = x.shape[0]
    rule = "krum" if m == 1 else "multi-krum"
    if not krum_precondition(n, f):
        reason = f"n={n} <= 2f+2={2 * f + 2}"
        if not fallback:
            raise PreconditionError(f"{rule} needs n > 2f + 2 ({reason})")
        return _median_fallback(x, rule, reason)
    m = n - f if m is None else m
    if not 1 <= m <= n:
        raise ConfigError(f"multi-krum m must be in [1, {n}], got {m}")
    scores = krum_scores(pairwise_sq_distances(x), f)
    # Stable sort: equal scores keep index order, so ties go to the lowest index.
    order = torch.sort(scores, stable=True).indices
    chosen = order[:m].sort().values
    agg = x[chosen[0]].clone() if m == 1 else x.index_select(0, chosen).mean(dim=0)
    kept = tuple(int(i) for i in chosen)
    rejected = tuple(i for i in range(n) if i not in set(kept))
    return AggregateResult(agg, rule, kept, rejected, tuple(float(s) for s in scores))


def krum(x: torch.Tensor, f: int, fallback: bool = True) -> AggregateResult:
    """Krum (Blanchard et al., 2017): the single update with the lowest score."""
    return multi_krum(x, f, m=1, fallback=fallback)


def coordinate_median(x: torch.Tensor, f: int = 0) -> AggregateResult:
    """Coordinate-wise median (the mean of the two middle values when n is even)."""
    _check(x, f)
    n = x.shape[0]
    if n == 1:
        agg = x[0].clone()
    else:
        s = x.sort(dim=0).values
        agg = s[(n - 1) // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    return AggregateResult(agg, "median", tuple(range(n)), ())


def trimmed_mean(x: torch.Tensor, f: int, fallback: bool = True) -> AggregateResult:
    """Coordinate-wise mean after dropping the f largest and f smallest values per coordinate."""
    _check(x, f)
    n = x.shape[0]
    if n <= 2 * f:
        reason = f"n={n} <= 2f={2 * f}"
        if not fallback:
            raise PreconditionError(f"trimmed-mean needs n > 2f ({reason})")
        return _median_fallback(x, "trimmed-mean", reason)
    agg = x.sort(dim=0).values[f : n - f].mean(dim=0) if f else x.mean(dim=0)
    return AggregateResult(agg, "trimmed-mean", tuple(range(n)), ())


def fedavg(x: torch.Tensor, f: int = 0, weights: torch.Tensor | None = None) -> AggregateResult:
    """Weighted mean (FedAvg by sample counts when weights are counts); not robust."""
    _check(x, f)
    n = x.shape[0]
    if weights is None:
        agg = x.mean(dim=0)
    else:
        w = torch.as_tensor(weights, dtype=x.dtype, device=x.device)
        if w.shape != (n,) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ConfigError("fedavg weights must be n non-negative numbers with a positive sum")
        agg = (w / w.sum()) @ x
    return AggregateResult(agg, "fedavg", tuple(range(n)), ())


# Every rule in the registry takes (updates, f, weights): f attackers assumed, weights the
# sample counts (only FedAvg uses them), so callers never special-case a rule.
Rule = Callable[[torch.Tensor, int, "torch.Tensor | None"], AggregateResult]

RULES: Registry[Rule] = Registry(
    "aggregation rule",
    {
        "krum": lambda x, f, w: krum(x, f),
        "multi-krum": lambda x, f, w: multi_krum(x, f),
        "median": lambda x, f, w: coordinate_median(x),
        "trimmed-mean": lambda x, f, w: trimmed_mean(x, f),
        "fedavg": lambda x, f, w: fedavg(x, weights=w),
    },
)


def attackers_for(n: int, byzantine_fraction: float) -> int:
    """f for a group of n updates, from the configured share of attackers (rounded up).

    Rounding up is the cautious side: 5 updates at a 30% share assume 2 attackers.
    """
    if not 0 <= byzantine_fraction < 0.5:
        raise ConfigError(f"byzantine fraction must be in [0, 0.5), got {byzantine_fraction}")
    return math.ceil(n * byzantine_fraction - 1e-9)
