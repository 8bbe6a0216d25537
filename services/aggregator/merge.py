"""Global merges of cluster (or participant) models (ALGORITHM.md section 6).

The fair merge weighs a cluster by acc^-q: the worse the current global model serves a
cluster, the more that cluster's model counts. q-FFL (Li et al., ICLR 2020) is the fairness
baseline from the literature.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from services.common.errors import ConfigError
from services.common.registry import Registry

ZERO_ACCURACY = 0.1  # the research code treats an accuracy of exactly 0 as 0.1
MIN_ACCURACY = 1e-6


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
class MergeInputs:
    """What a merge may use: the round's base model, the defended deltas and the figures."""

    global_w: torch.Tensor
    cluster_deltas: Mapping[int, torch.Tensor]  # surviving groups' robust deltas
    deltas: torch.Tensor  # every update of the round, as rows
    kept: Sequence[int]  # rows the defence did not reject
    round: int
    cluster_accuracy: Mapping[int, float] = field(default_factory=dict)
    losses: Sequence[float] | None = None  # per row: loss of the global model before training
    q: float = 0.5
    lr: float = 0.05


MergeResult = tuple[torch.Tensor, dict[int, float]]  # next global model, weight per group


def _even(inputs: MergeInputs) -> MergeResult:
    cs = sorted(inputs.cluster_deltas)
    if not cs:
        return inputs.global_w, {}
    weights = torch.full((len(cs),), 1.0 / len(cs), dtype=torch.float64)
    return _apply(inputs, cs, weights)


def _apply(inputs: MergeInputs, cs: list[int], weights: torch.Tensor) -> MergeResult:
    stacked = torch.stack([inputs.cluster_deltas[c] for c in cs])
    new = inputs.global_w + weighted_merge(stacked, weights)
    return new, {c: float(w) for c, w in zip(cs, weights, strict=True)}


def mean_merge(inputs: MergeInputs) -> MergeResult:
    """Every surviving group counts the same."""
    return _even(inputs)


def accuracy_merge(inputs: MergeInputs) -> MergeResult:
    """The fair merge: group c weighs acc_c^-q; round 0 (no accuracies yet) is the mean."""
    cs = sorted(inputs.cluster_deltas)
    if not cs or inputs.round == 0 or not all(c in inputs.cluster_accuracy for c in cs):
        return _even(inputs)
    return _apply(inputs, cs, q_weights([inputs.cluster_accuracy[c] for c in cs], inputs.q))


def qffl_round(inputs: MergeInputs) -> MergeResult:
    """q-FFL over the participants the defence kept (it has no per-group weights)."""
    if inputs.losses is None or len(inputs.losses) != inputs.deltas.shape[0]:
        raise ConfigError("q-FFL needs one pre-training loss per update")
    keep = list(inputs.kept)
    if not keep:
        return inputs.global_w, {}
    idx = torch.tensor(keep, device=inputs.deltas.device)
    local = inputs.global_w + inputs.deltas.index_select(0, idx)
    losses = [inputs.losses[i] for i in keep]
    return qffl_merge(inputs.global_w, local, losses, lr=inputs.lr), {}


MERGES: Registry[Callable[[MergeInputs], MergeResult]] = Registry(
    "merge", {"mean": mean_merge, "accuracy": accuracy_merge, "qffl": qffl_round}
)
