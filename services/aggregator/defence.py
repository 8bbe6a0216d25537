"""The Byzantine defence of one round: screen updates, run the robust rule inside each
cluster, check cluster models against each other, then merge fairly.

What the rules see are deltas against the global model the round started from, not raw
weights: an honest delta is small and points where the data pulls, while a negated or scaled
model is a delta of about twice (or many times) the whole model. Three layers, each reported:

1. Round-wide norm screen. A delta longer than `norm_factor` times the median delta length
   of the whole round is rejected. Taken over every selected participant, not per cluster,
   so it holds as long as attackers are a minority of the round even when one cluster is
   mostly attackers (which fair selection makes likely: 5 of 10 with 3 attackers gives a
   majority 17% of the time).
2. The robust rule inside each cluster (Multi-Krum by default: it averages the n - f best
   instead of keeping one, so a clean round loses little; f from the configured share).
3. Cluster check. A cluster delta longer than `cluster_factor` times the lower median of the
   cluster delta lengths is dropped and the merge weights are renormalised over the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from services.aggregator.robust import RULES, AggregateResult, attackers_for
from services.common.errors import ConfigError


@dataclass(frozen=True)
class DefenceConfig:
    """Which robust rule runs inside clusters and how hard each layer screens."""

    rule: str = "multi-krum"
    byzantine_fraction: float = 0.3
    norm_factor: float | None = 3.0  # None switches the round-wide norm screen off
    cluster_factor: float | None = 3.0  # None switches the cluster check off

    def __post_init__(self) -> None:
        RULES[self.rule]
        attackers_for(1, self.byzantine_fraction)
        for name in ("norm_factor", "cluster_factor"):
            v = getattr(self, name)
            if v is not None and v <= 1:
                raise ConfigError(f"{name} must be above 1 (or None), got {v}")


@dataclass
class RoundDefence:
    """Outcome of the defence: a delta per surviving cluster and every rejection, with why."""

    cluster_deltas: dict[int, torch.Tensor]
    cluster_results: dict[int, AggregateResult]
    rejected_updates: dict[int, str] = field(default_factory=dict)  # row -> reason
    rejected_clusters: dict[int, str] = field(default_factory=dict)  # cluster -> reason

    @property
    def fallbacks(self) -> dict[int, str]:
        """Clusters whose rule fell back, with the reason."""
        return {c: r.fallback for c, r in self.cluster_results.items() if r.fallback}


def norm_screen(deltas: torch.Tensor, factor: float) -> torch.Tensor:
    """Mask of rows whose length is at most factor times the median length of all rows."""
    norms = deltas.norm(dim=1)
    med = norms.median()
    if float(med) == 0.0:
        return norms == 0
    return norms <= factor * med


def defend(
    deltas: torch.Tensor,
    clusters: Sequence[int],
    config: DefenceConfig,
    samples: Sequence[int] | None = None,
) -> RoundDefence:
    """Screen, aggregate per cluster and check the cluster deltas of one round.

    `deltas` is (n, d), row i the update of a participant in cluster `clusters[i]`;
    `samples` (sample counts) weigh the rows when the rule is fedavg. Every tensor is made
    on the device of `deltas` (a GPU computes the Gram products there).
    """
    n = deltas.shape[0]
    device = deltas.device
    labels = np.asarray(clusters)
    if labels.shape != (n,):
        raise ConfigError(f"{labels.size} cluster labels for {n} updates")
    rejected: dict[int, str] = {}
    # A row whose sum is finite has only finite entries (an Inf or NaN makes the sum one):
    # the elementwise check, with its n x d mask, runs only for the other rows.
    finite = torch.isfinite(deltas.sum(dim=1))
    for i in torch.nonzero(~finite).flatten().tolist():
        finite[i] = bool(torch.isfinite(deltas[i]).all())
    for i in torch.nonzero(~finite).flatten().tolist():
        rejected[i] = "non-finite"
    keep = finite.clone()
    if config.norm_factor is not None and int(keep.sum()) >= 3:
        ok = torch.zeros(n, dtype=torch.bool, device=device)
        ok[keep] = norm_screen(deltas[keep], config.norm_factor)
        for i in torch.nonzero(keep & ~ok).flatten().tolist():
            rejected[i] = "norm"
        keep &= ok

    out = RoundDefence({}, {}, rejected)
    w_all = None
    if samples is not None:
        w_all = torch.as_tensor(samples, dtype=torch.float32, device=device)
    kept = keep.cpu().numpy()  # one copy off the device, not one per row
    for c in sorted(int(v) for v in np.unique(labels)):
        rows = [i for i in np.flatnonzero(labels == c).tolist() if kept[i]]
        if not rows:
            out.rejected_clusters[c] = "no update survived screening"
            continue
        idx = torch.tensor(rows, device=device)
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        res = RULES[config.rule](
            deltas.narrow(0, rows[0], len(rows)) if contiguous else deltas.index_select(0, idx),
            attackers_for(len(rows), config.byzantine_fraction),
            None if w_all is None else w_all[idx],
        )
        # Map the rule's local indices back to rows of `deltas`.
        res = AggregateResult(
            res.aggregate,
            res.rule,
            tuple(rows[i] for i in res.kept),
            tuple(rows[i] for i in res.rejected),
            res.scores,
            res.fallback,
        )
        for i in res.rejected:
            out.rejected_updates[i] = config.rule
        out.cluster_results[c] = res
        out.cluster_deltas[c] = res.aggregate

    if config.cluster_factor is not None and len(out.cluster_deltas) >= 2:
        cs = sorted(out.cluster_deltas)
        norms = torch.stack([out.cluster_deltas[c].norm() for c in cs])
        ref = float(norms.median())  # lower median: the smaller one when there are two
        for c, nrm in zip(cs, norms.tolist(), strict=True):
            if ref > 0 and nrm > config.cluster_factor * ref:
                out.rejected_clusters[c] = f"cluster delta {nrm / ref:.1f}x the median length"
                del out.cluster_deltas[c]
    return out
