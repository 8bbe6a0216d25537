"""Attacks that stay close to the honest updates, by attackers who collude (simulations only).

Colluding attackers pool the honest updates they trained (deltas against the global model
they started from) and all send one crafted delta built from those alone: by default they
never see an honest participant's update (--attack-knowledge own). Omniscient colluders
(--attack-knowledge omniscient, the literature's standard threat model for these attacks,
`flclustering local` only) craft from every participant's honest delta of the round and
know the defence's settings and each row's cluster (`View.mine`, `View.clusters`,
`View.defence`). Each attack is a pure function over the (k, d) matrix of the deltas they
know; each attack's `Colluding` class crafts with it (the hooks:
services/participant/attacks.py); `Collusion` is how attackers hosted by one participant
process pool them.

- ALIE, "A little is enough" (Baruch et al., NeurIPS 2019): mean - z * std per coordinate,
  with z from the number of participants n and of attackers f.
- IPM, inner-product manipulation (Xie et al., UAI 2020): -epsilon * mean.
- Min-Max and Min-Sum (Shejwalkar and Houmansadr, NDSS 2021): mean + gamma * p, gamma the
  largest for which the crafted delta is no farther from any honest one than the honest
  ones are from each other (Min-Max), or its sum of squared distances to them no larger
  than any honest one's (Min-Sum).
- Adaptive (defence-aware Min-Max): mean + gamma * p, gamma the largest for which the
  defence, rehearsed by the colluders on the deltas they know plus their jittered copies,
  keeps at least half of the copies; adaptive-steering adds a pre-training delta that lands
  among the honest participants' (to be clustered with them) and lies.
- Fitted (--attack-fit, any of the above but adaptive): the crafted delta shortened to the
  longest the rehearsed defence merges whole (`fitted`), so that no length bound acts on it.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist

import torch

from services.common.settings import DefenceSettings, FederationSettings
from services.core.defence import DefenceConfig, defend
from services.core.errors import ConfigError
from services.core.rounds import defence_for
from services.core.strategies import get_strategy
from services.participant.adversary import PERTURBATIONS
from services.participant.attacks import Attack, View, lie

SEARCH_STEPS = 40  # bisection steps for gamma: 2^-40 of the bracket
# adaptive: bisection steps after doubling (one rehearsed defence each: 2^-22 of the bracket
# is finer than any screen tells apart), the copies' jitter in units of the near-twin
# screen's factor, and the ceiling on gamma in honest median lengths over |p|.
ADAPTIVE_STEPS = 22
EVASION = 1.5
GAMMA_CAP = 10.0


def alie_z(n: int, f: int) -> float:
    """ALIE's z: s = floor(n / 2 + 1) - f supporters needed, z = Phi^-1((n - s) / n).

    Small groups make it small: n = 10, f = 2 gives s = 4 and z = 0.25; once
    (n - s) / n <= 0.5 the formula gives z <= 0 and the attack is nothing (z = 0 here: the
    colluders send their mean), which is why a searched strength matters.
    """
    if n < 1 or not 0 <= f <= n:
        raise ConfigError(f"ALIE needs 0 <= f <= n and n >= 1, got n={n}, f={f}")
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    if p <= 0.5:
        return 0.0
    return NormalDist().inv_cdf(min(p, 1.0 - 1e-6))


def _check(honest: torch.Tensor) -> None:
    if honest.dim() != 2 or honest.shape[0] < 1:
        raise ConfigError(
            f"colluders' updates must be a non-empty (k, d) matrix, got {tuple(honest.shape)}"
        )


def alie(honest: torch.Tensor, z: float) -> torch.Tensor:
    """Every coordinate at mean - z * std of the colluders' honest deltas."""
    _check(honest)
    mean = honest.mean(dim=0)
    std = honest.std(dim=0, unbiased=False)
    return mean - z * std


def ipm(honest: torch.Tensor, epsilon: float) -> torch.Tensor:
    """-epsilon times the colluders' mean honest delta: its inner product with the true
    mean is negative, which a mean-like rule then follows."""
    _check(honest)
    return -epsilon * honest.mean(dim=0)


def perturbation(honest: torch.Tensor, kind: str) -> torch.Tensor:
    """The direction the crafted delta moves from the mean: against the spread (std),
    against the mean's direction (unit) or against its signs (sign)."""
    mean = honest.mean(dim=0)
    if kind == "std":
        return -honest.std(dim=0, unbiased=False)
    if kind == "unit":
        norm = mean.norm()
        return -mean / norm if float(norm) > 0 else torch.zeros_like(mean)
    if kind == "sign":
        return -torch.sign(mean)
    raise ConfigError(f"unknown perturbation {kind!r}; choose one of {', '.join(PERTURBATIONS)}")


def _largest_gamma(
    ok: Callable[[float], bool],
    start: float = 1.0,
    steps: int = SEARCH_STEPS,
    cap: float = 1e12,
) -> float:
    """The largest gamma in [0, cap] with ok(gamma), found by doubling then `steps`
    bisections (ok is assumed monotone: true up to some gamma, false beyond)."""
    if not ok(0.0):
        return 0.0
    lo, hi = 0.0, min(start, cap)
    while ok(hi):
        if hi >= cap:
            return hi
        lo, hi = hi, min(2 * hi, cap)
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def _sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared distances between rows of a and rows of b (float64, from one product)."""
    a64, b64 = a.double(), b.double()
    d = (a64 * a64).sum(1)[:, None] + (b64 * b64).sum(1)[None, :] - 2.0 * a64 @ b64.T
    return d.clamp(min=0.0)


def _stealthiest(
    honest: torch.Tensor, kind: str, spread: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, float]:
    """mean + gamma * p with the largest gamma for which the crafted delta's spread from the
    honest deltas (`spread` of its row of squared distances to them) is no larger than the
    largest spread of an honest delta from the others; returns it and gamma."""
    _check(honest)
    mean, p = honest.mean(dim=0), perturbation(honest, kind)
    if not bool(p.any()):
        return mean, 0.0  # no direction to move in (one colluder, or all alike)
    bound = float(spread(_sq_distances(honest, honest)).max())

    def ok(gamma: float) -> bool:
        crafted = (mean + gamma * p)[None, :]
        return float(spread(_sq_distances(crafted, honest))[0]) <= bound

    gamma = _largest_gamma(ok)
    return mean + gamma * p, gamma


def min_max(honest: torch.Tensor, kind: str = "std") -> tuple[torch.Tensor, float]:
    """Min-Max: the crafted delta is no farther from any honest delta than the farthest two
    honest deltas are from each other."""
    return _stealthiest(honest, kind, lambda d: d.max(dim=1).values)


def min_sum(honest: torch.Tensor, kind: str = "std") -> tuple[torch.Tensor, float]:
    """Min-Sum: the crafted delta's sum of squared distances to the honest deltas is no
    larger than the largest such sum of an honest delta."""
    return _stealthiest(honest, kind, lambda d: d.sum(dim=1))


def steer(pretrain: torch.Tensor) -> torch.Tensor:
    """The pre-training delta every cluster-steering colluder sends: the mean of theirs."""
    _check(pretrain)
    return pretrain.mean(dim=0)


def median_distance(honest: torch.Tensor) -> float:
    """Median distance between two of the colluders' deltas (the lower median; their
    delta's length for one colluder)."""
    _check(honest)
    k = honest.shape[0]
    if k < 2:
        return float(honest[0].double().norm())
    d2 = _sq_distances(honest, honest)
    off = ~torch.eye(k, dtype=torch.bool, device=d2.device)
    return float(d2[off].median().sqrt())


def jittered(
    crafted: torch.Tensor, honest: torch.Tensor, jitter: float, generator: torch.Generator
) -> torch.Tensor:
    """One colluder's copy of the crafted delta, moved by a random vector of length jitter
    times the median distance between the colluders' honest deltas (unchanged at 0)."""
    if jitter == 0:
        return crafted
    if jitter < 0:
        raise ConfigError(f"jitter must be non-negative, got {jitter}")
    noise = torch.randn(crafted.shape, generator=generator, dtype=torch.float32)
    noise = noise.to(crafted.device, crafted.dtype)
    length = float(noise.norm())
    if length == 0:
        return crafted
    return crafted + noise * (jitter * median_distance(honest) / length)


def assumed_defence() -> DefenceConfig:
    """The defence colluders assume when they know only their own settings: the default
    strategy's, with the default defence settings (the participant is told neither)."""
    strategy = get_strategy(FederationSettings.model_fields["strategy"].default)
    return defence_for(strategy, DefenceSettings())


def evasion(defence: DefenceConfig, jitter: float) -> float:
    """The copies' jitter, in median distances between the honest deltas: EVASION times
    the near-twin screen's factor (so that no copy is a near-twin of another), or the
    configured --attack-jitter when larger."""
    twin = defence.twin_factor
    return max(jitter, EVASION * twin if twin is not None else 0.0)


def offsets(copies: int, d: int, length: float) -> torch.Tensor:
    """Fixed random vectors of the given length, one per copy, for rehearsing the defence:
    drawn from a fixed seed (not an attacker's stream), so that every colluder rehearses
    the same round and finds the same gamma."""
    noise = torch.randn(copies, d, generator=torch.Generator().manual_seed(0))
    return noise * (length / noise.norm(dim=1, keepdim=True).clamp(min=1e-12))


@dataclass(frozen=True)
class Rehearsal:
    """The round as the colluders picture it: the honest deltas they know (own knowledge:
    their own, standing in for the honest participants), each row's cluster, where their
    copies go, the defence they expect and the copies' fixed jitter."""

    honest: torch.Tensor  # (h, d)
    clusters: tuple[int, ...]  # the honest rows' clusters
    copies: tuple[int, ...]  # each copy's cluster
    defence: DefenceConfig
    offsets: torch.Tensor  # (len(copies), d)

    def kept(self, crafted: torch.Tensor) -> int:
        """How many jittered copies of `crafted` the defence merges whole (neither rejected
        nor in a cluster the check drops or shortens)."""
        rows = torch.cat([self.honest, crafted[None, :] + self.offsets])
        out = defend(rows.float(), self.clusters + self.copies, self.defence)
        whole = set(out.survivors) - set(out.shortened_clusters)
        h = self.honest.shape[0]
        return sum(
            1 for j, c in enumerate(self.copies) if h + j not in out.rejected_updates and c in whole
        )

    def keeps(self, crafted: torch.Tensor) -> bool:
        """Whether the defence merges at least half of the copies whole."""
        return 2 * self.kept(crafted) >= len(self.copies)


def rehearsal(pooled: torch.Tensor, view: View, jitter: float) -> Rehearsal:
    """The round the colluders rehearse, from what they know: with omniscient knowledge the
    honest participants' deltas, their clusters and the round's defence; with their own
    only, their own deltas as the honest ones, all in one cluster, one copy per colluder
    and the defence of the default settings."""
    defence = view.defence or assumed_defence()
    if view.mine is None:
        honest, clusters = pooled, (0,) * pooled.shape[0]
        copies = clusters
    else:
        labels = view.clusters or (0,) * len(view.mine)
        keep = [k for k, m in enumerate(view.mine) if not m]
        honest = pooled[keep] if keep else pooled[:0]
        clusters = tuple(labels[k] for k in keep)
        copies = tuple(c for c, m in zip(labels, view.mine, strict=True) if m)
    known = honest if honest.shape[0] >= 1 else pooled
    length = evasion(defence, jitter) * median_distance(known)
    return Rehearsal(
        honest, clusters, copies, defence, offsets(len(copies), pooled.shape[1], length)
    )


def defence_aware(
    pooled: torch.Tensor, plan: Rehearsal, kind: str = "std"
) -> tuple[torch.Tensor, float]:
    """Defence-aware Min-Max: mean + gamma * p over the deltas the colluders know, with the
    largest gamma for which the rehearsed defence keeps at least half of the copies; and
    gamma. A defence that keeps everything (fedavg: no screens, no robust rule) would let
    gamma grow without end: it is capped at GAMMA_CAP times the median honest length over
    |p|, already far beyond what any screen lets through."""
    _check(pooled)
    mean, p = pooled.mean(dim=0), perturbation(pooled, kind)
    size = float(p.double().norm())
    if size == 0.0:
        return mean, 0.0
    scale = float(pooled.double().norm(dim=1).median()) / size
    if scale == 0.0:
        return mean, 0.0
    gamma = _largest_gamma(
        lambda g: plan.keeps(mean + g * p),
        start=0.1 * scale,
        steps=ADAPTIVE_STEPS,
        cap=GAMMA_CAP * scale,
    )
    return mean + gamma * p, gamma


def evading(
    crafted: torch.Tensor,
    plan: Rehearsal,
    pooled: torch.Tensor,
    jitter: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """One colluder's copy of `crafted`, jittered as the rehearsal's copies are: by `evasion`
    times the median distance between the honest deltas the colluders know (their pooled
    ones when they know none), past the near-twin screen."""
    known = plan.honest if plan.honest.shape[0] >= 1 else pooled
    return jittered(crafted, known, evasion(plan.defence, jitter), generator)


def fitted(crafted: torch.Tensor, plan: Rehearsal) -> tuple[torch.Tensor, float]:
    """The crafted delta shortened to the longest the rehearsed defence keeps (at least
    half of the copies merged whole), and the factor: the attack of colluders who know the
    defence's thresholds (a screen or check that acts on what is longer than a bound lets
    through anything just under it, whole). Unchanged when the defence keeps it whole."""
    if plan.keeps(crafted):
        return crafted, 1.0
    scale = _largest_gamma(
        lambda s: plan.keeps(s * crafted), start=0.5, steps=ADAPTIVE_STEPS, cap=1.0
    )
    return scale * crafted, scale


class Colluding(Attack):
    """A colluding attack: every colluder sends one delta crafted from the colluders' pooled
    honest deltas (omniscient: every participant's; plus, with --attack-jitter, noise of
    its own), in the rounds it fires."""

    pools_update = True

    def crafts_update(self, round_: int) -> bool:
        return self.fires(round_)

    def craft(self, honest: torch.Tensor, n: int, f: int) -> torch.Tensor:
        """The delta the colluders send, from the honest deltas they know (k, d), the
        round's size n and the number of colluders f."""
        raise NotImplementedError

    def on_pooled(self, pooled: torch.Tensor, view: View) -> torch.Tensor:
        f = view.colluders(pooled).shape[0]
        crafted = self.craft(pooled, view.size, f)
        if self.config.fit:
            plan = rehearsal(pooled, view, self.config.jitter)
            crafted, scale = fitted(crafted, plan)
            view.say(
                "sends the %s delta of %d colluders in round %d, %.3g times as long",
                self.kind,
                f,
                view.round,
                scale,
            )
            return evading(crafted, plan, pooled, self.config.jitter, view.generator)
        crafted = jittered(crafted, pooled, self.config.jitter, view.generator)
        view.say("sends the %s delta of %d colluders in round %d", self.kind, f, view.round)
        return crafted


class Alie(Colluding):
    """Mean - z * std of the deltas the colluders know (z from n and f unless --attack-z)."""

    def strength(self) -> str:
        return f"z {'from n and f' if self.config.z is None else self.config.z}"

    def craft(self, honest: torch.Tensor, n: int, f: int) -> torch.Tensor:
        z = self.config.z
        return alie(honest, alie_z(n, f) if z is None else z)


class Ipm(Colluding):
    """-epsilon times the colluders' mean delta."""

    STRENGTH = "epsilon {c.epsilon}"

    def craft(self, honest: torch.Tensor, n: int, f: int) -> torch.Tensor:
        return ipm(honest, self.config.epsilon)


class MinMax(Colluding):
    """The mean moved as far as Min-Max's bound allows."""

    STRENGTH = "perturbation {c.perturbation}"

    def craft(self, honest: torch.Tensor, n: int, f: int) -> torch.Tensor:
        return min_max(honest, self.config.perturbation)[0]


class MinSum(Colluding):
    """The mean moved as far as Min-Sum's bound allows."""

    STRENGTH = "perturbation {c.perturbation}"

    def craft(self, honest: torch.Tensor, n: int, f: int) -> torch.Tensor:
        return min_sum(honest, self.config.perturbation)[0]


class ClusterSteering(Colluding):
    """The colluders send their mean pre-training delta (to be clustered together), then
    minus their mean delta, and report --attack-lie as their accuracy."""

    pools_pretrain = True

    STRENGTH = "reports accuracy {c.lie}"

    def craft(self, honest: torch.Tensor, n: int, f: int) -> torch.Tensor:
        return ipm(honest, 1.0)

    def on_pretrain(
        self, delta: torch.Tensor, view: View, pooled: torch.Tensor | None = None
    ) -> torch.Tensor:
        if pooled is None:
            raise ConfigError("cluster steering crafts from the colluders' pooled deltas")
        # The colluders' own mean, whatever else they know: to be clustered together.
        own = view.colluders(pooled)
        sent = jittered(steer(own), own, self.config.jitter, view.generator)
        view.say("sends the mean pre-training delta of %d colluders", own.shape[0])
        return sent

    def on_report(self, figures: dict[str, float], view: View) -> dict[str, float]:
        return lie(self, figures, view)


class Adaptive(Colluding):
    """Defence-aware Min-Max: the colluders rehearse the defence on the deltas they know
    plus their jittered copies and send mean + gamma * p with the largest gamma it keeps,
    each its copy jittered past the near-twin screen."""

    STRENGTH = "perturbation {c.perturbation}, knowledge {c.knowledge}"

    def on_pooled(self, pooled: torch.Tensor, view: View) -> torch.Tensor:
        plan = rehearsal(pooled, view, self.config.jitter)
        crafted, gamma = defence_aware(pooled, plan, self.config.perturbation)
        sent = evading(crafted, plan, pooled, self.config.jitter, view.generator)
        view.say(
            "sends the %s delta (gamma %.3g) of %d colluders in round %d",
            self.kind,
            gamma,
            len(plan.copies),
            view.round,
        )
        return sent


class AdaptiveSteering(Adaptive):
    """Cluster steering that knows the clustering: omniscient colluders send the mean of
    every participant's pre-training delta, jittered, so that the clustering puts each
    inside an honest cluster instead of in one of their own (which the cluster check and
    fair merge can outvote); with their own deltas only, their mean (plain steering).
    Then each round the defence-aware delta of `adaptive`, and --attack-lie as accuracy."""

    pools_pretrain = True

    STRENGTH = "perturbation {c.perturbation}, knowledge {c.knowledge}, reports accuracy {c.lie}"

    def on_pretrain(
        self, delta: torch.Tensor, view: View, pooled: torch.Tensor | None = None
    ) -> torch.Tensor:
        if pooled is None:
            raise ConfigError("cluster steering crafts from the colluders' pooled deltas")
        target = steer(pooled)  # own knowledge: their own mean; omniscient: everyone's
        jitter = evasion(view.defence or assumed_defence(), self.config.jitter)
        sent = jittered(target, pooled, jitter, view.generator)
        where = "every participant's" if view.mine is not None else "the colluders'"
        view.say("sends the mean pre-training delta of %s", where)
        return sent

    def on_report(self, figures: dict[str, float], view: View) -> dict[str, float]:
        return lie(self, figures, view)


class Collusion:
    """Where the attackers hosted by one process pool their honest deltas of a round.

    An attacker `enlist`s as soon as its training task arrives, trains, then `pool`s its
    honest delta: that waits until every attacker enlisted for the round has pooled (and
    `grace_s` more for one whose task is still on its way), then returns all the deltas
    pooled for the round, in the order they came. Attackers of the same process and round
    therefore craft from the same deltas and send the same update.
    """

    def __init__(self, grace_s: float = 0.5, timeout_s: float = 120.0) -> None:
        self._grace_s = grace_s
        self._timeout_s = timeout_s
        self._cond = threading.Condition()
        self._enlisted: dict[int, set[str]] = {}
        self._pooled: dict[int, dict[str, torch.Tensor]] = {}

    def enlist(self, round_: int, who: str) -> None:
        """`who` trains for this round and will pool its delta."""
        with self._cond:
            self._enlisted.setdefault(round_, set()).add(who)
            for old in [r for r in self._enlisted if r < round_ - 2]:
                self._enlisted.pop(old, None)
                self._pooled.pop(old, None)

    def pool(self, round_: int, who: str, delta: torch.Tensor) -> torch.Tensor:
        """Add this attacker's honest delta; the (k, d) matrix of the round's pool."""
        deadline = time.monotonic() + self._timeout_s
        with self._cond:
            self._enlisted.setdefault(round_, set()).add(who)
            pooled = self._pooled.setdefault(round_, {})
            pooled[who] = delta.detach().cpu()
            self._cond.notify_all()

            def complete() -> bool:
                # A round forgotten meanwhile (attackers enlisted rounds later: in --mode
                # async a slow colluder's task overlaps fast ones' later tasks) waits for
                # no one.
                return self._enlisted.get(round_, set()) <= set(pooled)

            while not complete() and time.monotonic() < deadline:
                self._cond.wait(timeout=0.05)
        time.sleep(self._grace_s)  # one whose task is still on its way
        with self._cond:
            while not complete() and time.monotonic() < deadline:
                self._cond.wait(timeout=0.05)
            return torch.stack([pooled[k] for k in sorted(pooled)])
