"""Global merges of cluster (or participant) models (ALGORITHM.md section 6).

The fair merge weighs a cluster by acc^-q: the worse the current global model serves a
cluster, the more that cluster's model counts. q-FFL (Li et al., ICLR 2020) is the fairness
baseline from the literature.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.common.errors import ConfigError

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


def mean_merge(models: torch.Tensor) -> torch.Tensor:
    """The plain mean (round 0 of FLClustering)."""
    return models.mean(dim=0)


def accuracy_merge(
    models: torch.Tensor, accuracies: Sequence[float], q: float = 0.5
) -> torch.Tensor:
    """The fair q-weighted merge: worse-served clusters weigh more."""
    return weighted_merge(models, q_weights(accuracies, q))


def sample_merge(models: torch.Tensor, samples: Sequence[int]) -> torch.Tensor:
    """Weights proportional to sample counts (FedAvg across clusters or participants)."""
    s = torch.as_tensor(samples, dtype=torch.float64)
    if bool((s < 0).any()) or float(s.sum()) <= 0:
        raise ConfigError(f"sample counts must be non-negative with a positive sum: {s.tolist()}")
    return weighted_merge(models, s / s.sum())


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
    f = torch.as_tensor(losses, dtype=torch.float64).flatten()
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
