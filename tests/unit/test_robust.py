"""Robust rules against naive loop references, and against attackers."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from services.core.errors import ConfigError, PreconditionError
from services.core.robust import (
    attackers_for,
    coordinate_median,
    fedavg,
    krum,
    krum_scores,
    multi_krum,
    pairwise_sq_distances,
    trimmed_mean,
)


def naive_scores(x: np.ndarray, f: int) -> np.ndarray:
    n = len(x)
    scores = []
    for i in range(n):
        d = sorted(float(((x[i] - x[j]) ** 2).sum()) for j in range(n) if j != i)
        scores.append(sum(d[: n - f - 2]))
    return np.array(scores)


def naive_median(x: np.ndarray) -> np.ndarray:
    out = np.empty(x.shape[1])
    for j in range(x.shape[1]):
        out[j] = float(np.median(x[:, j]))
    return out


def naive_trimmed(x: np.ndarray, f: int) -> np.ndarray:
    out = np.empty(x.shape[1])
    for j in range(x.shape[1]):
        col = sorted(x[:, j])
        out[j] = float(np.mean(col[f : len(col) - f]))
    return out


@st.composite
def update_sets(draw, min_n: int = 1, max_n: int = 12):
    n = draw(st.integers(min_n, max_n))
    d = draw(st.integers(1, 16))
    # Small integers make ties and exact duplicates common.
    values = st.integers(-4, 4).map(float) | st.floats(-10, 10, width=32)
    rows = draw(st.lists(st.lists(values, min_size=d, max_size=d), min_size=n, max_size=n))
    if n > 1 and draw(st.booleans()):
        rows[draw(st.integers(1, n - 1))] = list(rows[0])  # an exact duplicate
    return np.array(rows, dtype=np.float32)


@settings(max_examples=150, deadline=None)
@given(update_sets(min_n=1))
def test_gram_distances_match_loops(x):
    d = pairwise_sq_distances(torch.from_numpy(x)).numpy()
    ref = ((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1)
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(d, ref, atol=1e-4 * scale)
    assert (d >= 0).all() and (np.diag(d) == 0).all()


def against_naive_scores(rule, x, f):
    """rule (Krum or Multi-Krum) on x with f lowered to what x admits (n > 2f + 2): its
    result, that f, the naive Krum scores and the scale of their tolerance."""
    if not len(x) > 2 * f + 2:
        f = (len(x) - 3) // 2
    ref = naive_scores(x.astype(np.float64), f)
    return rule(torch.from_numpy(x), f), f, ref, max(1.0, float(ref.max()))


@settings(max_examples=150, deadline=None)
@given(update_sets(min_n=4), st.integers(0, 4))
def test_krum_matches_naive(x, f):
    n = len(x)
    res, f, ref, scale = against_naive_scores(krum, x, f)
    np.testing.assert_allclose(res.scores, ref, atol=1e-4 * scale)
    chosen = res.kept[0]
    # The chosen update's score is the minimum (ties: any minimiser; rounding: within tol).
    assert ref[chosen] <= ref.min() + 1e-4 * scale
    np.testing.assert_array_equal(res.aggregate.numpy(), x[chosen])
    assert sorted(res.kept + res.rejected) == list(range(n))
    assert res.fallback is None


@settings(max_examples=100, deadline=None)
@given(update_sets(min_n=4), st.integers(0, 3))
def test_multi_krum_matches_naive(x, f):
    n = len(x)
    res, f, ref, scale = against_naive_scores(multi_krum, x, f)
    m = n - f
    assert len(res.kept) == m
    # Every kept score is no worse than every rejected one (up to rounding).
    if res.rejected:
        assert max(ref[list(res.kept)]) <= min(ref[list(res.rejected)]) + 1e-4 * scale
    np.testing.assert_allclose(
        res.aggregate.numpy(), x[list(res.kept)].mean(0), rtol=1e-5, atol=1e-5
    )


@settings(max_examples=150, deadline=None)
@given(update_sets(min_n=1))
def test_median_matches_naive(x):
    res = coordinate_median(torch.from_numpy(x))
    np.testing.assert_allclose(res.aggregate.numpy(), naive_median(x), rtol=1e-6, atol=1e-6)


@settings(max_examples=150, deadline=None)
@given(update_sets(min_n=1), st.integers(0, 5))
def test_trimmed_mean_matches_naive(x, f):
    res = trimmed_mean(torch.from_numpy(x), f)
    if len(x) <= 2 * f:
        assert res.fallback is not None and res.fallback.startswith("median")
        np.testing.assert_allclose(res.aggregate.numpy(), naive_median(x), rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_allclose(res.aggregate.numpy(), naive_trimmed(x, f), rtol=1e-5, atol=1e-5)


def test_krum_ties_go_to_lowest_index():
    x = torch.zeros(6, 3)  # all identical: every score is 0
    assert krum(x, 1).kept == (0,)
    assert multi_krum(x, 1).kept == (0, 1, 2, 3, 4)


@pytest.mark.parametrize("factor", [-1.0, 10.0, -5.0, 100.0])
@pytest.mark.parametrize("n,f", [(5, 1), (7, 2), (11, 4), (20, 8)])
def test_krum_picks_an_honest_update(factor, n, f):
    gen = torch.Generator().manual_seed(n * 31 + f)
    honest_center = torch.randn(1000, generator=gen)
    x = honest_center + 0.1 * torch.randn(n, 1000, generator=gen)
    attackers = torch.randperm(n, generator=gen)[:f]
    x[attackers] = x[attackers] * factor
    res = krum(x, f)
    assert res.fallback is None
    assert res.kept[0] not in set(attackers.tolist())
    mk = multi_krum(x, f)
    assert not set(mk.kept) & set(attackers.tolist())
    assert set(mk.rejected) == set(attackers.tolist())


def test_krum_precondition_fallback_is_reported():
    x = torch.randn(4, 10)
    res = krum(x, 1)  # 4 > 4 is false
    assert res.fallback is not None and "n=4 <= 2f+2=4" in res.fallback
    torch.testing.assert_close(res.aggregate, coordinate_median(x).aggregate)
    with pytest.raises(PreconditionError):
        krum(x, 1, fallback=False)
    with pytest.raises(PreconditionError):
        krum_scores(pairwise_sq_distances(x), 2)


def test_fedavg_weights_by_samples():
    x = torch.tensor([[0.0, 0.0], [4.0, 8.0]])
    res = fedavg(x, weights=torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(res.aggregate, torch.tensor([1.0, 2.0]))
    with pytest.raises(ConfigError):
        fedavg(x, weights=torch.tensor([0.0, 0.0]))


def test_attackers_for_rounds_up_and_checks_range():
    assert attackers_for(5, 0.3) == 2
    assert attackers_for(5, 0.2) == 1
    assert attackers_for(10, 0.0) == 0
    with pytest.raises(ConfigError):
        attackers_for(5, 0.5)


def test_bad_shapes_are_rejected():
    with pytest.raises(ConfigError):
        krum(torch.zeros(0, 3), 0)
    with pytest.raises(ConfigError):
        coordinate_median(torch.zeros(3))
