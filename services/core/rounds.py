"""One round's aggregation as a pure function: defence inside clusters, then the merge.

The aggregator service and the in-process federation both call this, so the algorithm
exists once. It reads the deltas as column blocks (`rows.py`): one pass builds the Gram
matrix, from which the defence and the merge decide everything but the coordinate-wise
rules' values; one more pass writes the next model (plus one for the cluster check when a
cluster's rule is coordinate-wise). A matrix in memory is a single block.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from services.core.defence import DefenceConfig, RoundDefence, defend_rows
from services.core.errors import ConfigError
from services.core.merge import MERGES, MergeFacts, MergePlan
from services.core.privacy import (
    CentralNoise,
    NoiseReport,
    ScaledRows,
    add_noise,
    clip_factors,
    next_clip,
    scaled_scan,
    sensitivity,
    update_multiplier,
)
from services.core.robust import Selection
from services.core.rows import MatrixRows, Rows, Scan, scan, take
from services.core.sensitivity import MEAN_RULES
from services.core.strategies import Strategy


@dataclass(frozen=True)
class RoundOutcome:
    """The next global model, the defence's report and each cluster's merge weight (and,
    personalised, the next model of each cluster that had a surviving update)."""

    global_weights: torch.Tensor
    defence: RoundDefence
    cluster_weights: dict[int, float]
    cluster_models: dict[int, torch.Tensor] = field(default_factory=dict)
    noise: NoiseReport | None = None  # central differential privacy: what it did


class DefenceKnobs(Protocol):
    """The defence's constants as the settings carry them (common.settings.DefenceSettings):
    a protocol, so the core reads them without importing the configuration layer."""

    @property
    def byzantine_fraction(self) -> float: ...
    @property
    def norm_factor(self) -> float: ...
    @property
    def cluster_factor(self) -> float: ...
    @property
    def twin_factor(self) -> float: ...
    @property
    def q(self) -> float: ...
    @property
    def mixing(self) -> bool: ...
    @property
    def direction_check(self) -> bool: ...
    @property
    def recentre(self) -> bool: ...
    @property
    def clip_median(self) -> bool: ...


def defence_for(strategy: Strategy, settings: DefenceKnobs) -> DefenceConfig:
    """The defence a strategy runs: its rule, plus the screens when it is defended."""
    return DefenceConfig(
        strategy.rule,
        settings.byzantine_fraction,
        settings.norm_factor if strategy.defended else None,
        settings.cluster_factor if strategy.defended else None,
        settings.twin_factor if strategy.defended else None,
        settings.mixing and strategy.defended,
        settings.direction_check,
        settings.recentre,
    )


def combine(
    global_w: torch.Tensor, rows: Rows, defence: RoundDefence, plan: MergePlan
) -> torch.Tensor:
    """The next model, one column block at a time: base + sum_c p_c * delta_c + a @ rows.

    Linear cluster rules fold into one coefficient per row, so their part of a block is one
    matrix-vector product over the rows that count (a rejected row, finite or not, is never
    read into it); coordinate-wise rules are computed on their rows of the block.
    """
    n, d = rows.shape
    coefficients = torch.zeros(n, dtype=torch.float64)
    coordinatewise: list[tuple[float, int]] = []
    for c, p in plan.group_weights.items():
        choice = defence.cluster_results[c]
        w = choice.selection.coefficients
        if w is None:
            coordinatewise.append((p, c))
        else:
            coefficients[list(choice.rows)] += p * w.detach().to("cpu", torch.float64)
    if plan.row_coefficients is not None:
        coefficients += plan.row_coefficients
    active = torch.nonzero(coefficients).flatten().tolist()
    a = coefficients[active].to(rows.device, torch.float32)
    out = torch.empty(d, dtype=torch.float32, device=rows.device)
    for start, block in rows.blocks():
        part = out.narrow(0, start, block.shape[1])
        part.copy_(global_w.narrow(0, start, block.shape[1]))
        if active:
            part.addmv_(take(block, active).T, a)
        whole = start == 0 and block.shape[1] == d
        for p, c in coordinatewise:
            known = defence.cluster_deltas.get(c) if whole else None
            part.add_(defence.cluster_results[c].apply(block) if known is None else known, alpha=p)
    return out


def aggregate_round(
    global_w: torch.Tensor,
    deltas: torch.Tensor | Rows,
    clusters: Sequence[int],
    samples: Sequence[int],
    strategy: Strategy,
    round_: int,
    cluster_accuracy: Mapping[int, float],
    defence: DefenceKnobs,
    losses: Sequence[float] | None = None,
    lr: float = 0.05,
    steps: Sequence[int] | None = None,
    cluster_bases: Mapping[int, torch.Tensor] | None = None,
    privacy: CentralNoise | None = None,
) -> RoundOutcome:
    """Aggregate one round's deltas (rows of `deltas`, against `global_w`) into the next model.

    `deltas` is an (n, d) matrix or rows read in blocks (the aggregator's store). The
    strategy's merge decides the weights: the q-weighted merge weighs cluster c by acc_c^-q
    from round 1 on; q-FFL uses the losses of the global model each participant reported
    before training, and (`steps`, the local SGD steps behind each delta) to estimate its L.

    Personalised (`cluster_bases`: each cluster's current model; a cluster without one
    trained from `global_w`): a row is a delta against its cluster's model, each surviving
    cluster's next model is its model plus its robust delta, and the next global model is
    the merge's weighted sum of those models (the fair merge of the cluster models).
    """
    rows = MatrixRows(deltas) if isinstance(deltas, torch.Tensor) else deltas
    if privacy is not None:
        if cluster_bases is not None:
            raise ConfigError("central differential privacy releases one merged model only")
        return private_round(
            global_w, rows, clusters, strategy, round_, cluster_accuracy, defence, privacy
        )
    found = None
    if defence.clip_median and strategy.defended:
        # One clipping stage, as central DP's: every update clipped to the round's median
        # length (FLAME), so that a boosted update counts as an ordinary one.
        found = scan(rows)
        rows, found = median_clipped(rows, found)
    outcome, found = defend_rows(rows, clusters, defence_for(strategy, defence), samples, found)
    n = rows.shape[0]
    kept = [i for i in range(n) if i not in outcome.rejected_updates]
    facts = MergeFacts(
        outcome.survivors,
        kept,
        round_,
        cluster_accuracy,
        losses,
        found.gram.diagonal(),
        defence.q,
        lr,
        steps,
    )
    plan = MERGES[strategy.merge](facts)
    if not plan.group_weights and plan.row_coefficients is None:
        return RoundOutcome(global_w, outcome, {})
    if cluster_bases is None:
        new = combine(global_w.to(rows.device), rows, outcome, plan)
        return RoundOutcome(new, outcome, plan.group_weights)
    if plan.row_coefficients is not None:
        raise ConfigError(f"merge {strategy.merge!r} has no per-cluster models to personalise")
    models: dict[int, torch.Tensor] = {}
    merged = torch.zeros_like(global_w, device=rows.device)
    for c, p in plan.group_weights.items():
        base = cluster_bases.get(c, global_w).to(rows.device)
        models[c] = combine(base, rows, outcome, MergePlan({c: 1.0}))
        merged.add_(models[c], alpha=p)
    return RoundOutcome(merged, outcome, plan.group_weights, models)


def median_clipped(rows: Rows, found: Scan) -> tuple[Rows, Scan]:
    """The rows clipped to the median length of the finite ones, and their Gram matrix
    (from the unclipped one: no second pass)."""
    sq = found.gram.diagonal()
    finite = sq[found.finite]
    if finite.numel() == 0:
        return rows, found
    bound = float(finite.double().clamp(min=0).sqrt().median())
    if bound <= 0:
        return rows, found
    factors = clip_factors(sq, bound)
    return ScaledRows(rows, factors), scaled_scan(found, factors)


def fixed_means(outcome: RoundDefence, expected: Mapping[int, float]) -> None:
    """Make every cluster's aggregate the sum of its rows over its expected sampled count
    (the clipped mean whose sensitivity is C / n_c: the realised count, or the sample
    counts participants declare, would let one participant move it further)."""
    for c, choice in outcome.cluster_results.items():
        n = len(choice.rows)
        short = outcome.shortened_clusters.get(c)
        scale = 1.0 if short is None else short.scale  # the cluster check's, kept
        mean = torch.full((n,), scale / expected[c], dtype=torch.float32)
        rule = choice.selection.rule
        selection = Selection(rule, tuple(range(n)), (), coefficients=mean)
        outcome.cluster_results[c] = replace(choice, selection=selection)


def private_round(
    global_w: torch.Tensor,
    rows: Rows,
    clusters: Sequence[int],
    strategy: Strategy,
    round_: int,
    cluster_accuracy: Mapping[int, float],
    defence: DefenceKnobs,
    privacy: CentralNoise,
) -> RoundOutcome:
    """One round under central differential privacy (core/privacy.py): clip every update
    to C, run the defence and the rule on the clipped updates (the mean rule with fixed
    denominators), merge with weights over every cluster that has updates (a cluster the
    checks drop counts as zero, the others keep their weight), and add Gaussian noise of
    z times the merge's sensitivity."""
    found = scan(rows)
    sq = found.gram.diagonal()
    factors = clip_factors(sq, privacy.clip)
    following, over = next_clip(privacy, sq, found.finite)
    clipped = ScaledRows(rows, factors)
    outcome, _ = defend_rows(
        clipped, clusters, defence_for(strategy, defence), None, scaled_scan(found, factors)
    )
    if strategy.rule in MEAN_RULES:
        fixed_means(outcome, privacy.expected)
    present = sorted(set(int(c) for c in clusters))
    n = rows.shape[0]
    kept = [i for i in range(n) if i not in outcome.rejected_updates]
    facts = MergeFacts(present, kept, round_, cluster_accuracy, None, None, defence.q)
    weights = MERGES[strategy.merge](facts).group_weights
    survivors = set(outcome.survivors)
    merged = {c: p for c, p in weights.items() if c in survivors}
    sens = sensitivity(privacy, weights, {c: strategy.rule for c in weights})
    sigma = update_multiplier(privacy.noise, privacy.count_noise) * sens
    new = combine(global_w.to(rows.device), clipped, outcome, MergePlan(merged))
    new = add_noise(new, sigma, privacy.generator)
    report = NoiseReport(privacy.clip, following, sigma, sens, over)
    return RoundOutcome(new, outcome, merged, noise=report)
