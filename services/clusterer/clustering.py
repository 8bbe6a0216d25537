"""Clustering participants by their pre-training deltas (ALGORITHM.md section 3).

Hierarchical (Ward) by default, k-means and DBSCAN as alternatives, k given or chosen
automatically. Deltas longer than a threshold are first sketched down to a few thousand
dimensions with a sparse random projection (CountSketch), which keeps pairwise distances in
expectation at O(n d) cost, so clustering cost does not grow with the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from services.common.errors import ConfigError

METHODS = ("hierarchical", "kmeans", "dbscan")
AUTO_K = ("silhouette", "energy")


@dataclass(frozen=True)
class ClusterResult:
    """Cluster of each participant (0..k-1), k, the quality score and how k was found."""

    assignment: np.ndarray
    k: int
    score: float  # silhouette in [-1, 1]; nan when undefined (k = 1 or k = n)
    method: str
    k_from: str  # "given", "silhouette", "energy" or "dbscan"
    projected_dim: int | None = None


def count_sketch(x: torch.Tensor, dim: int, seed: int = 0, chunk: int = 1 << 20) -> torch.Tensor:
    """Project rows of x to `dim` coordinates: each input coordinate goes to one random
    output coordinate with a random sign. Pairwise distances are kept in expectation.

    The hash is generated chunk by chunk from the seed, so memory stays O(n * dim + chunk).
    """
    n, d = x.shape
    out = torch.zeros(n, dim, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, d, chunk):
        stop = min(d, start + chunk)
        bucket = torch.randint(0, dim, (stop - start,), generator=gen)
        sign = torch.randint(0, 2, (stop - start,), generator=gen).float().mul_(2).sub_(1)
        out.index_add_(1, bucket, x[:, start:stop].float().cpu() * sign)
    return out


def screen_deltas(deltas: torch.Tensor, factor: float = 10.0) -> torch.Tensor:
    """Mask of pre-training deltas fit to cluster: finite, and at most `factor` times the
    median length (lengths in float64, so values near the float32 limit cannot overflow).

    Pre-training runs the same number of steps everywhere, so honest lengths are alike; one
    participant's absurd delta must not fail the clustering of everyone else.
    """
    x = deltas.double()
    finite = torch.isfinite(x).all(dim=1)
    norms = torch.where(finite, x.nan_to_num(0.0).norm(dim=1), torch.inf)
    ok = finite & torch.isfinite(norms)
    if int(ok.sum()) >= 3:
        ok &= norms <= factor * norms[ok].median()
    return ok


def _silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import silhouette_score

    k = len(np.unique(labels))
    if k < 2 or k >= len(labels):
        return float("nan")
    return float(silhouette_score(x, labels))


def _fit(x: np.ndarray, method: str, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import AgglomerativeClustering, KMeans

    if method == "hierarchical":
        return AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(x)
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)


def energy_k(x: np.ndarray, share: float = 0.9, k_max: int | None = None) -> int:
    """Smallest k whose top-k singular values of the centred deltas hold `share` of the energy."""
    centred = x - x.mean(axis=0, keepdims=True)
    s = np.linalg.svd(centred, compute_uv=False)
    energy = np.cumsum(s**2) / max(float((s**2).sum()), 1e-30)
    k = int(np.searchsorted(energy, share) + 1)
    return max(1, min(k, k_max or len(x)))


def _dbscan(x: np.ndarray, eps: float | None, min_samples: int) -> np.ndarray:
    """DBSCAN; noise points join the cluster of their nearest core point."""
    from sklearn.cluster import DBSCAN

    if eps is None:
        # Median distance to the min_samples-th neighbour: a common, scale-free choice.
        d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
        kth = np.sort(d, axis=1)[:, min(min_samples, len(x) - 1)]
        eps = float(np.median(kth)) or 1e-12
    model = DBSCAN(eps=eps, min_samples=min_samples).fit(x)
    labels = model.labels_.copy()
    if (labels >= 0).any():
        core = np.flatnonzero(labels >= 0)
        for i in np.flatnonzero(labels < 0):
            nearest = core[np.argmin(((x[core] - x[i]) ** 2).sum(1))]
            labels[i] = labels[nearest]
    else:
        labels[:] = 0
    _, labels = np.unique(labels, return_inverse=True)
    return labels


def cluster(
    deltas: torch.Tensor,
    k: int | None = 3,
    method: str = "hierarchical",
    auto: str = "silhouette",
    k_max: int = 10,
    project_above: int = 4096,
    project_dim: int = 2048,
    seed: int = 0,
    dbscan_eps: float | None = None,
    dbscan_min_samples: int = 2,
) -> ClusterResult:
    """Group participants whose pre-training deltas look alike.

    `k=None` chooses k automatically (`auto`: best silhouette over 2..k_max, or the energy
    rule of the research code); DBSCAN finds its own k.
    """
    if method not in METHODS:
        raise ConfigError(
            f"unknown clustering method {method!r}; choose one of {', '.join(METHODS)}"
        )
    if deltas.dim() != 2 or deltas.shape[0] < 1:
        raise ConfigError(f"deltas must be a non-empty (n, d) matrix, got {tuple(deltas.shape)}")
    if not bool(torch.isfinite(deltas).all()):
        raise ConfigError("deltas contain NaN or Inf")
    n, d = deltas.shape
    projected = None
    if d > project_above:
        deltas = count_sketch(deltas, project_dim, seed)
        projected = project_dim
    x = deltas.detach().cpu().double().numpy()

    if method == "dbscan":
        labels = _dbscan(x, dbscan_eps, dbscan_min_samples)
        kk = int(labels.max()) + 1
        return ClusterResult(labels, kk, _silhouette(x, labels), method, "dbscan", projected)

    if k is not None:
        if not 1 <= k <= n:
            raise ConfigError(f"k must be between 1 and the number of participants ({n}), got {k}")
        labels = np.zeros(n, dtype=int) if k == 1 else _fit(x, method, k, seed)
        return ClusterResult(labels, k, _silhouette(x, labels), method, "given", projected)

    if auto not in AUTO_K:
        raise ConfigError(f"unknown automatic k rule {auto!r}; choose one of {', '.join(AUTO_K)}")
    upper = max(1, min(k_max, n - 1))
    if auto == "energy" or upper < 2:
        kk = energy_k(x, k_max=upper) if upper >= 2 else 1
        labels = np.zeros(n, dtype=int) if kk == 1 else _fit(x, method, kk, seed)
        return ClusterResult(labels, kk, _silhouette(x, labels), method, "energy", projected)
    best: tuple[float, np.ndarray, int] | None = None
    for kk in range(2, upper + 1):
        labels = _fit(x, method, kk, seed)
        s = _silhouette(x, labels)
        if best is None or s > best[0]:
            best = (s, labels, kk)
    assert best is not None
    return ClusterResult(best[1], best[2], best[0], method, "silhouette", projected)


def group_deltas(
    deltas: torch.Tensor, clusters: int | None, method: str = "hierarchical", seed: int = 0
) -> tuple[torch.Tensor, ClusterResult]:
    """Screen the pre-training deltas and cluster those fit to it into k (at most one per
    delta; None: chosen automatically). The clusterer and the in-process federation both
    group participants through here. Returns the fit mask and the clustering of its rows.
    """
    fit = screen_deltas(deltas)
    kept = deltas[fit]
    if kept.shape[0] == 0:
        raise ConfigError("no pre-training delta is fit to cluster (all non-finite or absurd)")
    k = None if clusters is None else min(clusters, kept.shape[0])
    return fit, cluster(kept, k=k, method=method, seed=seed)
