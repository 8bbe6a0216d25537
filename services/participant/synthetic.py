"""LEAF's Synthetic(alpha, beta): one participant's samples, generated alone.

The generator of the FedProx and q-FFL papers (Li et al. 2020; LEAF `data/synthetic`,
FedProx `generate_synthetic.py`): 60 features, 10 classes. Participant k draws
u_k ~ N(0, alpha) and B_k ~ N(0, beta) (alpha and beta are standard deviations, as in the
code); its model W_k (10x60) and b_k have entries ~ N(u_k, 1), its feature means v_k
entries ~ N(B_k, 1); a sample is x ~ N(v_k, Sigma) with Sigma diagonal, Sigma_jj = j^-1.2,
labelled y = argmax(W_k x + b_k). `iid` is FedProx's synthetic_iid: one model W, b shared
by everyone (drawn from the seed alone) and x ~ N(0, Sigma) for every participant.

Unlike the original, which draws every participant from one global stream, participant k
draws from its own stream seeded by (seed, k): its data is a pure function of
(seed, k, alpha, beta), so a process hosting a few of 10,000 participants generates just
those few, and agrees with every other process without talking.

Note (a property of the original generator, kept): u_k is added to every class's logit
alike (W_k x + b_k = u_k (sum(x) + 1) + ...), so it cancels in the argmax; alpha changes
the draws but not the label distribution. The heterogeneity comes from each participant's
own W_k (present even at alpha = beta = 0) and from its feature means (beta).

Sizes: the original's int(lognormal(4, 2)) + 50 samples has a heavy tail (a few
participants with 10^4-10^5 samples); here it is capped at MAX_SAMPLES (2,000, the
practical-noniid maximum). Each participant's samples are split 80/20 into train and test
(LEAF and FedProx use 90/10; 20% gives the smallest participant 10 test samples, not 5,
for a less noisy per-participant accuracy, which the fairness figures are made of).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.core.errors import ConfigError

FEATURES = 60
CLASSES = 10
MIN_SAMPLES = 50
MAX_SAMPLES = 2000
TEST_FRACTION = 0.2
# Stream tags: a participant's stream is (seed, _TAG, k); the iid variant's shared model
# is drawn from (seed, _IID_TAG).
_TAG = sum(map(ord, "synthetic"))
_IID_TAG = sum(map(ord, "synthetic-iid"))


@dataclass(frozen=True)
class SyntheticSamples:
    """One participant's samples: float32 features (n, 60) and int64 labels, train and test."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def feature_std() -> np.ndarray:
    """Standard deviation of each feature: sqrt(Sigma_jj) = j^-0.6 for j = 1..60."""
    return np.arange(1, FEATURES + 1, dtype=np.float64) ** -0.6


def sample_count(rng: np.random.Generator) -> int:
    """The original's int(lognormal(4, 2)) + 50, capped at MAX_SAMPLES."""
    return min(MAX_SAMPLES, int(rng.lognormal(4.0, 2.0)) + MIN_SAMPLES)


def shared_model(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """W (10x60) and b of the iid variant, the same for every participant."""
    rng = np.random.default_rng([seed, _IID_TAG])
    return rng.standard_normal((CLASSES, FEATURES)), rng.standard_normal(CLASSES)


def participant_samples(
    k: int, seed: int = 0, alpha: float = 1.0, beta: float = 1.0, iid: bool = False
) -> SyntheticSamples:
    """Participant k's samples of Synthetic(alpha, beta) (or synthetic_iid), split 80/20."""
    if k < 0 or seed < 0:
        raise ConfigError(f"synthetic: participant {k} and seed {seed} must not be negative")
    if not (alpha >= 0 and beta >= 0 and np.isfinite(alpha) and np.isfinite(beta)):
        raise ConfigError(f"synthetic: alpha {alpha} and beta {beta} must be finite and >= 0")
    rng = np.random.default_rng([seed, _TAG, k])
    n = sample_count(rng)
    if iid:
        w, b = shared_model(seed)
        mean = np.zeros(FEATURES)
    else:
        u, big_b = rng.standard_normal(2) * (alpha, beta)
        w = u + rng.standard_normal((CLASSES, FEATURES))
        b = u + rng.standard_normal(CLASSES)
        mean = big_b + rng.standard_normal(FEATURES)
    x = mean + rng.standard_normal((n, FEATURES)) * feature_std()
    y = np.argmax(x @ w.T + b, axis=1).astype(np.int64)
    n_test = max(1, round(TEST_FRACTION * n))
    x32 = x.astype(np.float32)
    return SyntheticSamples(x32[: n - n_test], y[: n - n_test], x32[n - n_test :], y[n - n_test :])
