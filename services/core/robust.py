"""Robust aggregation rules over an (n, d) matrix of updates (docs/algorithm.md, section 5).

Each rule is split in two so that it runs the same on a matrix in memory and on one read
back in column blocks (the aggregator's memory budget, `rows.py`): `select` decides from the
n x n Gram matrix alone which rows count (Krum's distances, the fallback), and the decision
(`Selection`) then computes the aggregate, either as fixed coefficients over the rows (Krum,
Multi-Krum, FedAvg: one weighted row sum) or coordinate by coordinate on any column block
(median, trimmed mean). All pairwise distances come from the Gram matrix; nothing loops over
pairs or layers in Python. A rule whose precondition fails takes the documented fallback and
reports it in `fallback`; it never falls back silently.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from services.core.distances import distances_from_gram, gram_of
from services.core.errors import ConfigError, PreconditionError
from services.core.registry import Registry


@dataclass(frozen=True)
class AggregateResult:
    """An aggregate, the inputs it rests on, and any fallback that was taken."""

    aggregate: torch.Tensor
    rule: str
    kept: tuple[int, ...]
    rejected: tuple[int, ...]
    scores: tuple[float, ...] = field(default=())
    fallback: str | None = None


Coordinatewise = Callable[[torch.Tensor], torch.Tensor]  # (n, b) block -> (b,)


@dataclass(frozen=True)
class Selection:
    """A rule's decision over n rows, before any coordinate is read.

    Exactly one of `coefficients` (the aggregate is coefficients @ rows) and `coordinate`
    (the aggregate of a column block is coordinate(block)) is set.
    """

    rule: str
    kept: tuple[int, ...]
    rejected: tuple[int, ...]
    scores: tuple[float, ...] = ()
    fallback: str | None = None
    coefficients: torch.Tensor | None = None  # (n,) float32
    coordinate: Coordinatewise | None = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The aggregate of (a column block of) the rows this selection was made for."""
        if self.coefficients is not None:
            return self.coefficients.to(x.device, x.dtype) @ x
        assert self.coordinate is not None
        return self.coordinate(x)

    def result(self, x: torch.Tensor) -> AggregateResult:
        """The selection applied to the whole matrix."""
        return AggregateResult(
            self.apply(x), self.rule, self.kept, self.rejected, self.scores, self.fallback
        )


def pairwise_sq_distances(x: torch.Tensor) -> torch.Tensor:
    """All squared Euclidean distances between rows of x, by one Gram-matrix product."""
    return distances_from_gram(gram_of(x))


def krum_scores(dist: torch.Tensor, f: int) -> torch.Tensor:
    """Krum score of each row: sum of squared distances to its n - f - 2 nearest others."""
    n = dist.shape[0]
    m = n - f - 2
    if m < 1:
        raise PreconditionError(f"Krum needs n > 2f + 2; got n={n}, f={f}")
    masked = dist + torch.diag(torch.full((n,), math.inf, dtype=dist.dtype, device=dist.device))
    nearest = masked.topk(m, dim=1, largest=False).values
    return nearest.sum(dim=1)


def _check_gram(gram: torch.Tensor, f: int) -> int:
    if gram.dim() != 2 or gram.shape[0] == 0 or gram.shape[0] != gram.shape[1]:
        raise ConfigError(f"updates must be a non-empty (n, d) matrix (Gram {tuple(gram.shape)})")
    if f < 0:
        raise ConfigError(f"number of attackers f must be >= 0, got {f}")
    return gram.shape[0]


def _check(x: torch.Tensor, f: int) -> None:
    if x.dim() != 2 or x.shape[0] == 0:
        raise ConfigError(f"updates must be a non-empty (n, d) matrix, got shape {tuple(x.shape)}")
    if f < 0:
        raise ConfigError(f"number of attackers f must be >= 0, got {f}")


def krum_precondition(n: int, f: int) -> bool:
    """Whether Krum's guarantee holds: n > 2f + 2."""
    return n > 2 * f + 2


def median_of(x: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median of the rows (the mean of the two middle values when n is even)."""
    n = x.shape[0]
    if n == 1:
        return x[0].clone()
    s = x.sort(dim=0).values
    return s[(n - 1) // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def trimmed_mean_of(x: torch.Tensor, f: int) -> torch.Tensor:
    """Coordinate-wise mean after dropping the f largest and f smallest values."""
    n = x.shape[0]
    return x.sort(dim=0).values[f : n - f].mean(dim=0) if f else x.mean(dim=0)


def median_select(gram: torch.Tensor, f: int = 0) -> Selection:
    """Coordinate-wise median: keeps every row."""
    n = _check_gram(gram, f)
    return Selection("median", tuple(range(n)), (), coordinate=median_of)


def _median_fallback(n: int, rule: str, reason: str) -> Selection:
    return Selection(rule, tuple(range(n)), (), fallback=f"median: {reason}", coordinate=median_of)


def multi_krum_select(
    gram: torch.Tensor, f: int, m: int | None = None, fallback: bool = True
) -> Selection:
    """Multi-Krum: the mean of the m rows with the lowest Krum scores (m = n - f default).

    With m = 1 this is Krum. Ties go to the lower index. Below n > 2f + 2 the coordinate-wise
    median is taken instead (reported), or PreconditionError raised if fallback is off.
    """
    n = _check_gram(gram, f)
    rule = "krum" if m == 1 else "multi-krum"
    if not krum_precondition(n, f):
        reason = f"n={n} <= 2f+2={2 * f + 2}"
        if not fallback:
            raise PreconditionError(f"{rule} needs n > 2f + 2 ({reason})")
        return _median_fallback(n, rule, reason)
    m = n - f if m is None else m
    if not 1 <= m <= n:
        raise ConfigError(f"multi-krum m must be in [1, {n}], got {m}")
    scores = krum_scores(distances_from_gram(gram), f)
    # Stable sort: equal scores keep index order, so ties go to the lowest index.
    order = torch.sort(scores, stable=True).indices
    chosen = order[:m].sort().values
    coefficients = torch.zeros(n, dtype=torch.float32, device=gram.device)
    coefficients[chosen] = 1.0 / m
    kept = tuple(int(i) for i in chosen)
    rejected = tuple(i for i in range(n) if i not in set(kept))
    scored = tuple(float(s) for s in scores)
    return Selection(rule, kept, rejected, scored, coefficients=coefficients)


def trimmed_mean_select(gram: torch.Tensor, f: int, fallback: bool = True) -> Selection:
    """Coordinate-wise mean after dropping the f largest and f smallest values per coordinate."""
    n = _check_gram(gram, f)
    if n <= 2 * f:
        reason = f"n={n} <= 2f={2 * f}"
        if not fallback:
            raise PreconditionError(f"trimmed-mean needs n > 2f ({reason})")
        return _median_fallback(n, "trimmed-mean", reason)
    return Selection(
        "trimmed-mean", tuple(range(n)), (), coordinate=lambda x: trimmed_mean_of(x, f)
    )


def fedavg_select(gram: torch.Tensor, f: int = 0, weights: torch.Tensor | None = None) -> Selection:
    """Weighted mean (FedAvg by sample counts when weights are counts); not robust."""
    n = _check_gram(gram, f)
    if weights is None:
        w = torch.full((n,), 1.0 / n, dtype=torch.float32, device=gram.device)
    else:
        w = torch.as_tensor(weights, dtype=torch.float32, device=gram.device)
        if w.shape != (n,) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ConfigError("fedavg weights must be n non-negative numbers with a positive sum")
        w = w / w.sum()
    return Selection("fedavg", tuple(range(n)), (), coefficients=w)


CC_ITERATIONS = 3  # Karimireddy et al. find 1-3 iterations enough from a good start
COUNT_CAP = 2.0  # a row's sample count weighs at most this times the median count


def centred_clipping_select(
    gram: torch.Tensor, f: int, weights: torch.Tensor | None = None
) -> Selection:
    """Centred clipping (Karimireddy, He and Jaggi, ICML 2021) from a Multi-Krum start:
    v <- v + sum_i w_i clip(x_i - v, tau), CC_ITERATIONS times, tau the median of |x_i - v|,
    w_i the rows' sample counts (capped at COUNT_CAP times their median: they are what each
    participant declares) over their sum, or 1 / n.

    Why: Multi-Krum drops the f rows farthest from the rest whole, and under heterogeneous
    data those are honest participants whose data differ (it cost 6 points against FedAvg on
    digits, Dirichlet(0.3)). Clipping shrinks a far row towards the centre instead of
    dropping it: a row within tau counts fully, as in the mean, and no row, honest or not,
    moves the aggregate by more than tau / n. tau is the median distance, so it needs no
    scale from the user and follows the round. Counts as FedAvg weighs them: participants
    with more data pull more (unweighted, the rule trailed FedAvg by 4-5 points on
    Dirichlet(0.3) shards, whose sizes differ tenfold; weighted, within a point), but one
    that claims a billion samples weighs twice the median. v stays a fixed combination of
    rows, so the rule is linear (coefficients from the Gram matrix alone, as Krum's).
    """
    n = _check_gram(gram, f)
    start = multi_krum_select(gram, f)
    if start.coefficients is None:  # too few rows for Krum: the median, reported
        return replace(start, rule="centred-clipping")
    g = gram.double()
    a = start.coefficients.to(g.dtype)
    if weights is None:
        share = torch.full((n,), 1.0 / n, dtype=g.dtype, device=g.device)
    else:
        w = weights.to(g.device, g.dtype).clamp(min=0)
        w = w.clamp(max=COUNT_CAP * float(w.median()))  # counts are what participants say
        share = w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1.0 / n)
    eye = torch.eye(n, dtype=g.dtype, device=g.device)
    for _ in range(CC_ITERATIONS):
        diff = eye - a[None, :]  # row i: e_i - a, so x_i - v = diff_i @ X
        dist = ((diff @ g) * diff).sum(dim=1).clamp(min=0).sqrt()
        tau = float(dist.median())
        if tau <= 0:
            break
        scale = (tau / dist.clamp(min=1e-30)).clamp(max=1.0)
        a = a + ((share * scale)[:, None] * diff).sum(dim=0)
    coefficients = a.to(torch.float32)
    return Selection(
        "centred-clipping", tuple(range(n)), (), start.scores, coefficients=coefficients
    )


# The same rules over a matrix in memory (the selection applied to all of it).


def multi_krum(
    x: torch.Tensor, f: int, m: int | None = None, fallback: bool = True
) -> AggregateResult:
    """Multi-Krum over the rows of x (see `multi_krum_select`)."""
    _check(x, f)
    return multi_krum_select(gram_of(x), f, m, fallback).result(x)


def krum(x: torch.Tensor, f: int, fallback: bool = True) -> AggregateResult:
    """Krum (Blanchard et al., 2017): the single update with the lowest score."""
    return multi_krum(x, f, m=1, fallback=fallback)


def coordinate_median(x: torch.Tensor, f: int = 0) -> AggregateResult:
    """Coordinate-wise median (the mean of the two middle values when n is even)."""
    _check(x, f)
    n = x.shape[0]
    return AggregateResult(median_of(x), "median", tuple(range(n)), ())


def trimmed_mean(x: torch.Tensor, f: int, fallback: bool = True) -> AggregateResult:
    """Coordinate-wise trimmed mean over the rows of x (see `trimmed_mean_select`)."""
    _check(x, f)
    n = x.shape[0]
    return trimmed_mean_select(torch.zeros(n, n, device=x.device), f, fallback).result(x)


def fedavg(x: torch.Tensor, f: int = 0, weights: torch.Tensor | None = None) -> AggregateResult:
    """Weighted mean over the rows of x (see `fedavg_select`)."""
    _check(x, f)
    n = x.shape[0]
    return fedavg_select(torch.zeros(n, n, device=x.device), f, weights).result(x)


# Every rule in the registry takes (Gram matrix, f, weights): f attackers assumed, weights
# the sample counts (only FedAvg uses them), so callers never special-case a rule. Rules
# that read only coordinates ignore the Gram matrix's values (it still gives n).
Rule = Callable[[torch.Tensor, int, "torch.Tensor | None"], Selection]

RULES: Registry[Rule] = Registry(
    "aggregation rule",
    {
        "krum": lambda g, f, w: multi_krum_select(g, f, m=1),
        "multi-krum": lambda g, f, w: multi_krum_select(g, f),
        "median": lambda g, f, w: median_select(g),
        "trimmed-mean": lambda g, f, w: trimmed_mean_select(g, f),
        "centred-clipping": lambda g, f, w: centred_clipping_select(g, f, w),
        "fedavg": lambda g, f, w: fedavg_select(g, weights=w),
    },
)


def nnm_mixing(gram: torch.Tensor, f: int) -> torch.Tensor:
    """Nearest-neighbour mixing's matrix (Allouah et al., AISTATS 2023): row i averages the
    n - f rows nearest to row i, itself included (ties to the lower index), from the Gram
    matrix alone.

    Why: Krum-type rules drop the updates farthest from the rest, and under heterogeneous
    data those are honest participants whose data differ (measured: Multi-Krum inside
    clusters cost 6 points against FedAvg on digits, Dirichlet(0.3)). Mixing first pulls
    every row towards its neighbours, so the rule drops little honest signal, while an
    attacker's row still counts at most 1 / (n - f) in each mix it enters.
    """
    n = _check_gram(gram, f)
    m = max(1, n - f)
    dist = distances_from_gram(gram)
    order = torch.sort(dist, dim=1, stable=True).indices[:, :m]
    mix = torch.zeros(n, n, dtype=torch.float32, device=gram.device)
    mix.scatter_(1, order, 1.0 / m)
    return mix


def mixed(selection: Selection, mix: torch.Tensor) -> Selection:
    """A rule's decision over mixed rows (mix @ rows) as a decision over the rows: linear
    rules' coefficients become mix^T coefficients; coordinate-wise ones read mix @ block."""
    if selection.coefficients is not None:
        w = selection.coefficients.to(mix.device, mix.dtype) @ mix
        return replace(selection, coefficients=w)
    coordinate = selection.coordinate
    assert coordinate is not None
    m = mix

    def over_mixed(x: torch.Tensor) -> torch.Tensor:
        return coordinate(m.to(x.device, x.dtype) @ x)

    return replace(selection, coordinate=over_mixed)


def mixed_select(rule: Rule, gram: torch.Tensor, f: int, weights: torch.Tensor | None) -> Selection:
    """`rule` over the nearest-neighbour mixes of the rows (`nnm_mixing`): the mixed rows'
    Gram matrix is mix G mix^T, so nothing but the n x n matrices is computed."""
    mix = nnm_mixing(gram, f).to(gram.dtype)
    return mixed(rule(mix @ gram @ mix.T, f, weights), mix.float())


KRUM_RULES = ("krum", "multi-krum", "centred-clipping")


def rule_minimum(rule: str, byzantine_fraction: float) -> int:
    """The fewest updates `rule` runs on without its fallback: Krum's n > 2f + 2 and the
    trimmed mean's n > 2f, with f = ceil(n x share); other rules any n."""
    if rule not in KRUM_RULES and rule != "trimmed-mean":
        return 1
    for n in range(1, 10_000):
        f = attackers_for(n, byzantine_fraction)
        ok = krum_precondition(n, f) if rule in KRUM_RULES else n > 2 * f
        if ok:
            return n
    raise ConfigError(f"no buffer runs {rule} at a byzantine fraction of {byzantine_fraction}")


def attackers_for(n: int, byzantine_fraction: float) -> int:
    """f for a group of n updates, from the configured share of attackers (rounded up).

    Rounding up is the cautious side: 5 updates at a 30% share assume 2 attackers.
    """
    if not 0 <= byzantine_fraction < 0.5:
        raise ConfigError(f"byzantine fraction must be in [0, 0.5), got {byzantine_fraction}")
    return math.ceil(n * byzantine_fraction - 1e-9)
