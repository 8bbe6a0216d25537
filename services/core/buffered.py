"""Asynchronous buffered aggregation (FedBuff, Nguyen et al., AISTATS 2022) inside clusters.

In `--mode async` nobody waits for a round: participants train continuously on the newest
model they have, and each cluster's updates are buffered. When a cluster's buffer is full
the cluster's robust rule runs on it and the fair merge turns it into a new version:

    w_{v+1} = w_v + sum_{c flushed} p_c * rule_c( s(tau_i) * delta_i  for i in buffer_c )

- `delta_i` is update i against the version it was trained from (its base), and
  tau_i = v - base_i its staleness in versions; s(tau) = 1 / sqrt(1 + tau / C) (FedBuff's
  polynomial, with C the number of clusters) shortens an update trained from an older
  model. With C clusters flushing in turn, C versions make what one synchronous round
  makes, so the age counts in those rounds: with 1/sqrt(1 + tau) an update one round old
  would already count 0.5 with three clusters. Counted in rounds, the final accuracy after
  90 versions was higher on every setting tried (docs/decisions.md: digits practical-
  noniid, rotated groups, Dirichlet(0.3) and the synthetic set). An
  update staler than `--max-staleness` versions is refused before it gets here.
- `p_c` is cluster c's fair weight among *every* cluster (the q-weights of the merge,
  summing to one over all of them), not renormalised over the clusters that flushed: one
  full buffer moves the model by its cluster's share only. A cycle in which every cluster
  flushes once moves it as one synchronous round does, so the fast clusters do not own the
  model and a cluster the model serves worse still pulls harder.
- The buffer is at least what the rule needs (`buffer_size_for`): Krum's n > 2f + 2 with
  f the configured share of the buffer, rounded up, so the robust rule never falls back.

Pure functions over tensors: the aggregator service and the in-process run call them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from services.core.defence import defend_rows
from services.core.errors import ConfigError
from services.core.merge import MERGES, MergeFacts, MergePlan
from services.core.privacy import ScaledRows, scaled_scan
from services.core.robust import rule_minimum
from services.core.rounds import DefenceKnobs, RoundOutcome, combine, defence_for
from services.core.rows import MatrixRows, Rows, scan
from services.core.strategies import Strategy

MIN_BUFFER = 5  # FedBuff's experiments use 10; below 5 a buffer is hardly a mean


def staleness_weight(staleness: int | float) -> float:
    """s(tau) = 1 / sqrt(1 + tau): how much an update trained from a model tau versions
    old counts (1 for a fresh one)."""
    if staleness < 0 or not math.isfinite(staleness):
        raise ConfigError(f"staleness must be a non-negative number, got {staleness}")
    return 1.0 / math.sqrt(1.0 + float(staleness))


def buffer_size_for(strategy: Strategy, byzantine_fraction: float, asked: int | None) -> int:
    """A cluster's buffer size: `asked`, or (None) the fewest the strategy's rule runs on
    and at least MIN_BUFFER. ConfigError when `asked` is too small for the rule."""
    need = rule_minimum(strategy.rule, byzantine_fraction)
    if asked is None:
        return max(MIN_BUFFER, need)
    if asked < need:
        raise ConfigError(
            f"--buffer-size {asked} is too small for {strategy.rule} at --byzantine-fraction "
            f"{byzantine_fraction:g}: it needs at least {need} updates"
        )
    return asked


def round_of(version: int, clusters: int) -> int:
    """The round a task of `version` counts as, for the learning-rate schedule: with C
    clusters flushing in turn, C versions make one round (decayed once per version, the
    rate fell three times as fast as in rounds with three clusters, and a run of 450
    versions on digits stalled at 0.97 where it reaches 0.98 without the decay)."""
    return max(0, version) // max(1, clusters)


def buffered_round(
    global_w: torch.Tensor,
    deltas: torch.Tensor | Rows,
    clusters: Sequence[int],
    samples: Sequence[int],
    staleness: Sequence[int],
    strategy: Strategy,
    version: int,
    cluster_accuracy: Mapping[int, float],
    defence: DefenceKnobs,
    known_clusters: Sequence[int] = (),
) -> RoundOutcome:
    """The next version from the flushed buffers (rows of `deltas`, each against its own
    base; `clusters` says whose buffer a row is in): scale each row by s(staleness), run
    the defence inside each cluster, and add each surviving cluster's robust delta times
    its fair weight among `known_clusters` (every cluster of the federation, whether its
    buffer is full or not; the flushed ones are always counted).

    `cluster_accuracy` is the newest known accuracy of the global model per cluster (the
    median of its members' evaluations); a cluster missing from it, or version 0, makes
    the weights even, as in round 0 of the synchronous merge.
    """
    rows = MatrixRows(deltas) if isinstance(deltas, torch.Tensor) else deltas
    n = rows.shape[0]
    if not (len(clusters) == len(samples) == len(staleness) == n):
        raise ConfigError(f"{n} updates with {len(clusters)} clusters and {len(staleness)} ages")
    groups = sorted({int(c) for c in known_clusters} | {int(c) for c in clusters})
    # Staleness in rounds: with C clusters flushing in turn, C versions make one round.
    ages = [staleness_weight(s / len(groups)) for s in staleness]
    factors = torch.tensor(ages, dtype=torch.float32)
    found = scan(rows)
    scaled = ScaledRows(rows, factors)
    outcome, _ = defend_rows(
        scaled, clusters, defence_for(strategy, defence), samples, scaled_scan(found, factors)
    )
    kept = [i for i in range(n) if i not in outcome.rejected_updates]
    facts = MergeFacts(groups, kept, version, cluster_accuracy, None, None, defence.q)
    weights = MERGES[strategy.merge](facts).group_weights
    survivors = set(outcome.survivors)
    merged = {c: p for c, p in weights.items() if c in survivors}
    if not merged:
        return RoundOutcome(global_w, outcome, {})
    new = combine(global_w.to(rows.device), scaled, outcome, MergePlan(merged))
    return RoundOutcome(new, outcome, merged)


def cluster_buffers(
    strategy: Strategy,
    byzantine_fraction: float,
    asked: int | None,
    members: Mapping[int, int],
) -> dict[int, int]:
    """Each cluster's buffer: `buffer_size_for`, or its member count when it has fewer
    members (one slot per participant: all of them then flush it), never below what its
    rule needs. ConfigError naming the first cluster too small for the rule."""
    size = buffer_size_for(strategy, byzantine_fraction, asked)
    need = rule_minimum(strategy.rule, byzantine_fraction)
    small = sorted((c, n) for c, n in members.items() if n < need)
    if small:
        c, n = small[0]
        sizes = ", ".join(f"{k}: {v}" for k, v in sorted(members.items()))
        raise ConfigError(
            f"--mode async: cluster {c} has {n} participant(s), but {strategy.rule} at "
            f"--byzantine-fraction {byzantine_fraction:g} needs a buffer of at least {need} "
            f"updates (cluster sizes {sizes}); use fewer --clusters, more --participants or "
            "another --strategy"
        )
    return {c: min(size, n) for c, n in sorted(members.items())}
