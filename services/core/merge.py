"""Global merges of cluster (or participant) models (docs/algorithm.md, section 6).

The fair merge weighs a cluster by acc^-q: the worse the current global model serves a
cluster, the more that cluster's model counts. q-FFL (Li et al., ICLR 2020) is the fairness
baseline from the literature.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from services.core.errors import ConfigError
from services.core.registry import Registry
from services.core.rows import take

ZERO_ACCURACY = 0.1  # the research code treats an accuracy of exactly 0 as 0.1
MIN_ACCURACY = 1e-6
ACCURACY_FLOOR = 0.5  # the fair merge counts no group as served worse than half the median


def q_weights(accuracies: Sequence[float] | torch.Tensor, q: float = 0.5) -> torch.Tensor:
    """p_c = acc_c^-q / sum_j acc_j^-q, with accuracy 0 counted as 0.1 (the seed's formula)."""
    acc = torch.as_tensor(accuracies, dtype=torch.float64).flatten()
    if acc.numel() == 0:
        raise ConfigError("q-weights need at least one accuracy")
    if bool(((acc < 0) | (acc > 1) | ~torch.isfinite(acc)).any()):
        raise ConfigError(f"accuracies must lie in [0, 1], got {acc.tolist()}")
    acc = torch.where(acc == 0, torch.full_like(acc, ZERO_ACCURACY), acc)
    # No sample of real accuracies gets this low; the clamp only keeps acc^-q finite.
    acc = acc.clamp(min=MIN_ACCURACY)
    w = acc.pow(-q)
    return w / w.sum()


def floored(accuracies: Sequence[float], ratio: float = ACCURACY_FLOOR) -> list[float]:
    """Each accuracy raised to at least `ratio` times their median (the upper median: with
    two groups, the better one's).

    What the q-weights trust is what participants report. A group whose evaluators all lie
    (accuracy 0: a cluster of attackers) would otherwise weigh acc^-q = 0.1^-0.5 = 3.2 times
    a group served at 1.0; floored at half the median, it weighs at most 2^q = 1.4 times the
    median group. Groups served worse than half the median are rare in honest runs, and
    they still weigh the most.
    """
    if not accuracies:
        return []
    ordered = sorted(accuracies)
    low = ratio * ordered[len(ordered) // 2]
    return [max(a, low) for a in accuracies]


def weighted_merge(models: torch.Tensor, weights: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """sum_c w_c * model_c for an (k, d) matrix of flat models and weights summing to 1."""
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if models.dim() != 2 or w.numel() != models.shape[0]:
        raise ConfigError(f"{w.numel()} weights for {models.shape[0]} models")
    if bool((w < 0).any()) or abs(float(w.sum()) - 1.0) > 1e-6:
        raise ConfigError(f"merge weights must be non-negative and sum to 1, got {w.tolist()}")
    return w.to(models.dtype).to(models.device) @ models


def qffl_merge(
    global_model: torch.Tensor,
    local_models: torch.Tensor,
    losses: Sequence[float],
    q: float = 1.0,
    lr: float = 0.05,
) -> torch.Tensor:
    """q-FFL's update (Li et al., ICLR 2020, Algorithm 2 with L = 1/lr).

    dw_k = L (w - w_k); Delta_k = F_k^q dw_k; h_k = q F_k^(q-1) |dw_k|^2 + L F_k^q;
    w' = w - sum_k Delta_k / sum_k h_k, where F_k is participant k's loss of the global model
    before training: higher-loss participants pull harder.
    """
    f = torch.as_tensor(losses, dtype=torch.float64, device=local_models.device).flatten()
    if f.numel() != local_models.shape[0]:
        raise ConfigError(f"{f.numel()} losses for {local_models.shape[0]} models")
    if bool((f < 0).any() | ~torch.isfinite(f).all()):
        raise ConfigError("q-FFL losses must be finite and non-negative")
    if lr <= 0 or q < 0:
        raise ConfigError("q-FFL needs lr > 0 and q >= 0")
    big_l = 1.0 / lr
    f = f.clamp(min=1e-10)
    dw = big_l * (global_model.unsqueeze(0) - local_models).to(torch.float64)
    fq = f.pow(q)
    h = q * f.pow(q - 1) * dw.pow(2).sum(dim=1) + big_l * fq
    step = (fq @ dw) / h.sum()
    return (global_model.to(torch.float64) - step).to(global_model.dtype)


@dataclass(frozen=True)
class MergeFacts:
    """What a merge decides from: the round's figures, never its coordinates."""

    groups: Sequence[int]  # the surviving groups, ascending
    kept: Sequence[int]  # rows the defence did not reject
    round: int
    cluster_accuracy: Mapping[int, float] = field(default_factory=dict)
    losses: Sequence[float] | None = None  # per row: loss of the global model before training
    sq_norms: torch.Tensor | None = None  # (n,) per row: |delta|^2 (the Gram diagonal)
    q: float = 0.5
    lr: float = 0.05
    steps: Sequence[int] | None = None  # per row: local SGD steps behind its delta (q-FFL)


@dataclass(frozen=True)
class MergePlan:
    """The next model as weighted sums: w' = w + sum_c p_c * group_delta_c + a @ deltas."""

    group_weights: dict[int, float]  # p_c for each surviving group
    row_coefficients: torch.Tensor | None = None  # a: (n,) float64, for merges over rows


def _even(facts: MergeFacts) -> MergePlan:
    return MergePlan({c: 1.0 / len(facts.groups) for c in facts.groups})


def mean_merge(facts: MergeFacts) -> MergePlan:
    """Every surviving group counts the same."""
    return _even(facts)


def accuracy_merge(facts: MergeFacts) -> MergePlan:
    """The fair merge: group c weighs acc_c^-q; round 0 (no accuracies yet) is the mean."""
    cs = list(facts.groups)
    if not cs or facts.round == 0 or not all(c in facts.cluster_accuracy for c in cs):
        return _even(facts)
    w = q_weights(floored([facts.cluster_accuracy[c] for c in cs]), facts.q)
    return MergePlan({c: float(v) for c, v in zip(cs, w, strict=True)})


def local_steps(samples: Sequence[int], epochs: int, batch_size: int) -> list[int]:
    """SGD steps behind each delta: epochs x ceil(samples / batch_size)."""
    return [epochs * max(1, math.ceil(s / batch_size)) for s in samples]


def qffl_round(facts: MergeFacts) -> MergePlan:
    """q-FFL over the participants the defence kept (it has no per-group weights).

    `qffl_merge`'s step with dw_k = -L delta_k written as coefficients over the rows:
    w' = w + sum_k (L F_k^q / sum_j h_j) delta_k, h_j = q F_j^(q-1) L^2 |delta_j|^2 + L F_j^q
    (q = 1 as in `qffl_merge`).

    L: the paper's 1/lr treats a delta as one gradient step, but a delta of several local
    epochs is S steps long, so q F^(q-1) L^2 |delta|^2 swamps L F^q and the step shrinks
    towards zero (q-FFL then does not learn: 0.55 on digits with 2 epochs). With the steps
    known (`facts.steps`), L = 1 / (lr x mean S): the delta read as one step of length
    lr x S, the estimate that suits multi-epoch local training; q = 0 is FedAvg either way.
    """
    if facts.losses is None or facts.sq_norms is None:
        raise ConfigError("q-FFL needs one pre-training loss per update")
    n = facts.sq_norms.numel()
    if len(facts.losses) != n:
        raise ConfigError("q-FFL needs one pre-training loss per update")
    keep = list(facts.kept)
    if not keep:
        return MergePlan({})
    if facts.lr <= 0:
        raise ConfigError("q-FFL needs lr > 0 and q >= 0")
    f = torch.as_tensor([facts.losses[i] for i in keep], dtype=torch.float64)
    if bool((f < 0).any() | ~torch.isfinite(f).all()):
        raise ConfigError("q-FFL losses must be finite and non-negative")
    q, big_l = 1.0, 1.0 / facts.lr
    if facts.steps is not None:
        if len(facts.steps) != n or min(facts.steps) < 1:
            raise ConfigError("q-FFL needs a positive step count per update")
        big_l /= float(np.mean([facts.steps[i] for i in keep]))
    f = f.clamp(min=1e-10)
    sq = facts.sq_norms.detach().to("cpu", torch.float64)[keep]
    fq = f.pow(q)
    h = q * f.pow(q - 1) * big_l**2 * sq + big_l * fq
    a = torch.zeros(n, dtype=torch.float64)
    a[keep] = big_l * fq / h.sum()
    return MergePlan({}, a)


MERGES: Registry[Callable[[MergeFacts], MergePlan]] = Registry(
    "merge", {"mean": mean_merge, "accuracy": accuracy_merge, "qffl": qffl_round}
)


@dataclass(frozen=True)
class MergeInputs:
    """A merge over tensors in memory: the base model, the groups' deltas and the rows."""

    global_w: torch.Tensor
    cluster_deltas: Mapping[int, torch.Tensor]  # surviving groups' robust deltas
    deltas: torch.Tensor  # every update of the round, as rows
    kept: Sequence[int]  # rows the defence did not reject
    round: int
    cluster_accuracy: Mapping[int, float] = field(default_factory=dict)
    losses: Sequence[float] | None = None
    q: float = 0.5
    lr: float = 0.05
    steps: Sequence[int] | None = None


MergeResult = tuple[torch.Tensor, dict[int, float]]  # next global model, weight per group


def merge(name: str, inputs: MergeInputs) -> MergeResult:
    """Merge `name` applied to tensors in memory (the round itself merges in blocks)."""
    cs = sorted(inputs.cluster_deltas)
    facts = MergeFacts(
        cs,
        inputs.kept,
        inputs.round,
        inputs.cluster_accuracy,
        inputs.losses,
        inputs.deltas.square().sum(dim=1),
        inputs.q,
        inputs.lr,
        inputs.steps,
    )
    plan = MERGES[name](facts)
    new = inputs.global_w.clone()
    if plan.group_weights:
        stacked = torch.stack([inputs.cluster_deltas[c] for c in plan.group_weights])
        new += weighted_merge(stacked, list(plan.group_weights.values()))
    if plan.row_coefficients is not None:
        rows = torch.nonzero(plan.row_coefficients).flatten().tolist()  # rejected rows: none
        if rows:
            a = plan.row_coefficients[rows].to(inputs.deltas.device, inputs.deltas.dtype)
            new += a @ take(inputs.deltas, rows)
    return new, plan.group_weights
