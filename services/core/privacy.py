"""Participant-level central differential privacy of one round (docs/privacy.md).

What the mechanism releases each round is the merged update
    w' - w = sum_c p_c * A_c(clip(x_i) for i in c) + N(0, sigma^2 I)
where x_i are the deltas of the participants Poisson-sampled into the round, clip scales
a delta to norm at most C, A_c is cluster c's rule and p_c the merge weight. Adjacency is
"zero-out": one participant's contributions are replaced by nothing (it sends a zero
delta), membership and the cluster assignment are public. One participant then changes
only its own cluster's A_c, and by at most
    - C / n_c for the clipped mean with a fixed denominator n_c (the cluster's expected
      sampled count: the realised count would leak whether it was sampled);
    - 2 sqrt(2) C for Krum, Multi-Krum, centred clipping and the median: their output can
      be another participant's update or a convex combination of a different subset (all
      in the ball of radius C; centred clipping's steps keep its coefficients non-negative
      and summing to 1),
      or the coordinate-wise median of a fallback (in the ball of radius sqrt(2) C: at
      least half the values of a coordinate are at least as large as the median's), so
      two outputs differ by at most twice that radius.
The merge scales it by p_c, so the sensitivity is C * max_c p_c * spread_c and the noise
is sigma = z * that: a participant of any cluster sees multiplier z or more. Merge
weights are never renormalised over the clusters that survive a data-dependent check (a
dropped cluster counts as zero), so that no participant moves the other clusters' weight.

Adaptive clipping (Andrew et al., NeurIPS 2021): the bound follows a target quantile of
the update norms, C <- C exp(-eta (b - gamma)), where b is the noised share of updates
within the bound; that count's noise is paid for by raising the update's noise so that
the round as a whole still has multiplier z (their Theorem 1).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from services.core.errors import ConfigError
from services.core.rows import Rows, Scan
from services.core.sensitivity import spread


def clip_factors(sq_norms: torch.Tensor, clip: float) -> torch.Tensor:
    """min(1, C / |x_i|) per row (0 for a row that is not finite: it is rejected anyway)."""
    norms = sq_norms.double().clamp(min=0).sqrt()
    out = torch.where(norms > clip, clip / norms.clamp(min=1e-30), torch.ones_like(norms))
    return torch.where(torch.isfinite(norms), out, torch.zeros_like(norms))


@dataclass(frozen=True)
class ScaledRows:
    """Rows each scaled by a factor (the clipped deltas), read in the same blocks."""

    rows: Rows
    factors: torch.Tensor  # (n,)

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows.shape

    @property
    def device(self) -> torch.device:
        return self.rows.device

    def blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        s = self.factors.to(self.rows.device, torch.float32).unsqueeze(1)
        for start, block in self.rows.blocks():
            # A zero factor (a non-finite row) must stay non-finite for the defence to see.
            yield start, torch.where(s == 0, block, block * s)


def scaled_scan(found: Scan, factors: torch.Tensor) -> Scan:
    """The Gram matrix of the scaled rows, from the unscaled one (no second pass)."""
    s = factors.to(found.gram.device, torch.float32)
    s = torch.where(s == 0, torch.ones_like(s), s)
    return Scan(found.gram * s.unsqueeze(0) * s.unsqueeze(1), found.finite)


def update_multiplier(noise: float, count_noise: float | None) -> float:
    """The noise multiplier of the update when the clipped count is released too with noise
    count_noise: z_update = (z^-2 - (2 sigma_b)^-2)^(-1/2) (Andrew et al., Theorem 1)."""
    if count_noise is None:
        return noise
    rest = noise**-2 - (2.0 * count_noise) ** -2
    if rest <= 0:
        raise ConfigError(
            f"adaptive clipping's count noise {count_noise:g} leaves nothing of noise "
            f"multiplier {noise:g}: the count noise must exceed {1 / (2 * noise):g}"
        )
    return rest**-0.5


@dataclass(frozen=True)
class CentralNoise:
    """The round's mechanism as the aggregator runs it.

    `expected`: every cluster of the round's expected sampled count (rate x size);
    `count_noise`: adaptive clipping's sigma_b (None: the bound stays `clip`).
    """

    clip: float
    noise: float  # multiplier z of the whole round
    expected: Mapping[int, float]
    generator: torch.Generator
    quantile: float | None = None
    clip_lr: float = 0.2
    count_noise: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"the clip bound must be positive and finite, got {self.clip}")
        if not (math.isfinite(self.noise) and self.noise > 0):
            raise ConfigError(f"the noise multiplier must be positive, got {self.noise}")
        if (self.quantile is None) != (self.count_noise is None):
            raise ConfigError("adaptive clipping needs both a quantile and a count noise")
        update_multiplier(self.noise, self.count_noise)


@dataclass(frozen=True)
class NoiseReport:
    """What the mechanism did in a round: for the record and the next round."""

    clip: float  # the bound used
    next_clip: float  # the bound of the next round (the same when fixed)
    sigma: float  # standard deviation of the noise on each coordinate of the merge
    sensitivity: float  # C * max_c p_c * spread_c
    clipped: int  # updates longer than the bound


def sensitivity(
    mechanism: CentralNoise, weights: Mapping[int, float], rules: Mapping[int, str]
) -> float:
    """C * max over the merged clusters of p_c * spread_c."""
    worst = 0.0
    for c, p in weights.items():
        if c not in mechanism.expected:
            raise ConfigError(f"cluster {c} has no expected sampled count")
        worst = max(worst, p * spread(rules[c], mechanism.expected[c]))
    return mechanism.clip * worst


def next_clip(
    mechanism: CentralNoise, sq_norms: torch.Tensor, finite: torch.Tensor
) -> tuple[float, int]:
    """The next round's bound (adaptive) and how many finite updates exceeded this one.

    b = (count of updates within the bound + N(0, sigma_b^2)) / expected total;
    C' = C exp(-eta (b - gamma)).
    """
    norms = sq_norms.double().clamp(min=0).sqrt()
    ok = finite.to(norms.device)
    within = int(((norms <= mechanism.clip) & ok).sum())
    over = int(ok.sum()) - within
    if mechanism.quantile is None or mechanism.count_noise is None:
        return mechanism.clip, over
    total = sum(mechanism.expected.values())
    noise = torch.randn((), generator=mechanism.generator, dtype=torch.float64).item()
    b = (within + mechanism.count_noise * noise) / max(total, 1e-12)
    return mechanism.clip * math.exp(-mechanism.clip_lr * (b - mechanism.quantile)), over


def add_noise(delta: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """delta + N(0, sigma^2 I), drawn on the CPU from `generator` (the same draws on every
    device, so a seeded simulation is reproducible)."""
    noise = torch.randn(delta.shape, generator=generator, dtype=torch.float32)
    return delta + sigma * noise.to(delta.device)


def expected_counts(sizes: Mapping[int, int], rates: Mapping[int, float]) -> dict[int, float]:
    """Each cluster's expected sampled count: its rate times its size."""
    return {c: rates[c] * sizes[c] for c in sizes}
