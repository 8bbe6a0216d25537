"""Central differential privacy of a round (core/privacy.py, core/rounds.py): the noise
has the scale docs/privacy.md derives, one participant moves the merge by at most the
sensitivity, clipping bounds every update, the sampling is Poisson, the budget stops a
run at the round it names, and the settings refuse what is not covered."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from services.core.accountant import Step, epsilon_of
from services.core.errors import ConfigError
from services.core.privacy import CentralNoise, clip_factors, update_multiplier
from services.core.rounds import aggregate_round
from services.core.selection import poisson_rates, poisson_select
from services.core.sensitivity import SPREAD_ANY
from services.core.strategies import get_strategy
from services.experiment import ExperimentConfig
from services.local import run_local

DEFENCE = ExperimentConfig().defence


def _round(
    deltas: torch.Tensor,
    clusters: list[int],
    strategy: str,
    mechanism: CentralNoise,
    accuracy: dict[int, float] | None = None,
):
    return aggregate_round(
        torch.zeros(deltas.shape[1]),
        deltas,
        clusters,
        [10] * len(clusters),
        get_strategy(strategy),
        1 if accuracy else 0,
        accuracy or {},
        DEFENCE,
        privacy=mechanism,
    )


def _mechanism(seed: int, expected: dict[int, float], clip: float = 2.0, noise: float = 1.5):
    return CentralNoise(clip, noise, expected, torch.Generator().manual_seed(seed))


def test_noise_on_a_zero_update_has_the_derived_scale():
    # sigma = z * C * max_c p_c / n_c: two clusters of expected 4 and 8 members, even
    # weights (round 0), so the smaller cluster sets it: 1.5 * 2.0 * 0.5 / 4 = 0.375.
    expected = {0: 4.0, 1: 8.0}
    clusters = [0, 0, 0, 1, 1, 1, 1, 1]
    zero = torch.zeros(len(clusters), 500)
    draws = torch.stack(
        [
            _round(zero, clusters, "flclustering-fedavg", _mechanism(s, expected)).global_weights
            for s in range(200)
        ]
    )
    sigma = 1.5 * 2.0 * 0.5 / 4
    # 100,000 draws: the estimate is within 1% of the truth with overwhelming probability.
    assert float(draws.std()) == pytest.approx(sigma, rel=0.01)
    assert abs(float(draws.mean())) < 0.01 * sigma * 10
    out = _round(zero, clusters, "flclustering-fedavg", _mechanism(0, expected))
    assert out.noise is not None and out.noise.sigma == pytest.approx(sigma)
    # The fair merge's weights scale it: the worse-served cluster weighs more.
    weighted = _round(
        zero, clusters, "flclustering-fedavg", _mechanism(0, expected), {0: 0.5, 1: 0.9}
    )
    p0 = 0.5**-0.5 / (0.5**-0.5 + 0.9**-0.5)
    assert weighted.noise is not None
    assert weighted.noise.sigma == pytest.approx(1.5 * 2.0 * max(p0 / 4, (1 - p0) / 8))


@pytest.mark.parametrize(
    "strategy", ["flclustering-fedavg", "fedavg", "flclustering", "krum", "median"]
)
def test_one_participant_moves_the_merge_by_at_most_the_sensitivity(strategy):
    rng = torch.Generator().manual_seed(3)
    grouped = get_strategy(strategy).clustered
    clusters = [0] * 6 + [1] * 6 if grouped else [0] * 12
    expected = {0: 6.0, 1: 6.0} if grouped else {0: 12.0}
    worst = 0.0
    for trial in range(20):
        deltas = torch.randn(12, 50, generator=rng) * (1 + trial % 4)
        deltas[trial % 12] *= 50  # an outlier, the one removed
        with_it = _round(deltas, clusters, strategy, _mechanism(7, expected))
        zeroed = deltas.clone()
        zeroed[trial % 12] = 0  # zero-out adjacency: it contributes nothing
        without = _round(zeroed, clusters, strategy, _mechanism(7, expected))
        assert with_it.noise is not None
        moved = float((with_it.global_weights - without.global_weights).norm())
        assert moved <= with_it.noise.sensitivity * (1 + 1e-4)
        worst = max(worst, moved / with_it.noise.sensitivity)
    bound = with_it.noise.sensitivity
    if strategy in ("flclustering-fedavg", "fedavg"):
        assert bound == pytest.approx(2.0 * (0.5 / 6 if grouped else 1 / 12))
        assert worst > 0.9  # the clipped outlier moves it by C / n: the bound is tight
    else:
        assert bound == pytest.approx(2.0 * SPREAD_ANY * (0.5 if grouped else 1.0))


def test_every_update_is_clipped_to_the_bound():
    norms = torch.tensor([0.5, 2.0, 8.0, float("inf")])
    factors = clip_factors(norms.square(), 2.0)
    assert factors.tolist() == [1.0, 1.0, 0.25, 0.0]
    # A cluster of one huge update: the merge moves by C / n, not by the update.
    deltas = torch.zeros(4, 10)
    deltas[0, 0] = 1e6
    out = _round(
        deltas, [0, 0, 0, 0], "fedavg", CentralNoise(1.0, 1e-9, {0: 4.0}, torch.Generator())
    )
    assert float(out.global_weights.norm()) == pytest.approx(0.25, rel=1e-3)
    assert out.noise is not None and out.noise.clipped == 1


def test_adaptive_clipping_follows_the_quantile_and_pays_for_its_count():
    deltas = torch.randn(40, 20, generator=torch.Generator().manual_seed(0))
    norms = deltas.norm(dim=1)
    mechanism = CentralNoise(
        0.1,
        1.0,
        {0: 40.0},
        torch.Generator().manual_seed(1),
        quantile=0.5,
        clip_lr=0.2,
        count_noise=2.0,
    )
    clip = 0.1
    for _ in range(60):
        out = _round(deltas, [0] * 40, "fedavg", mechanism)
        assert out.noise is not None
        clip = out.noise.next_clip
        mechanism = CentralNoise(
            clip, 1.0, {0: 40.0}, mechanism.generator, quantile=0.5, clip_lr=0.2, count_noise=2.0
        )
    assert clip == pytest.approx(float(norms.median()), rel=0.25)
    # The count's noise costs the update some: z_update = (1 - 1/16)^(-1/2) for sigma_b 2.
    assert update_multiplier(1.0, 2.0) == pytest.approx((1 - 1 / 16) ** -0.5)
    with pytest.raises(ConfigError, match="count noise"):
        update_multiplier(1.0, 0.4)


def test_poisson_sampling_draws_each_member_with_its_clusters_rate():
    labels = np.array([0] * 100 + [1] * 20)
    rates = poisson_rates({0: 100, 1: 20}, 20)
    assert rates == {0: 0.1, 1: 0.5}  # both clusters expect 10
    rng = np.random.default_rng(0)
    counts = np.zeros(120)
    for _ in range(2000):
        for members in poisson_select(labels, rates, rng).values():
            counts[members] += 1
    assert counts[:100].mean() / 2000 == pytest.approx(0.1, rel=0.05)
    assert counts[100:].mean() / 2000 == pytest.approx(0.5, rel=0.05)
    assert poisson_rates({0: 3, 1: 30}, 20)[0] == 1.0  # a rate is a probability


@pytest.mark.slow  # runs a federation: see tests/conftest.py
def test_the_budget_stops_the_run_before_the_round_that_would_exceed_it():
    rate = 3 / 10  # 30 participants, 3 clusters of 10 (practical-noniid), 9 a round
    budget = (epsilon_of([Step(1.0, rate, 3)], 1e-5) + epsilon_of([Step(1.0, rate, 4)], 1e-5)) / 2
    config = ExperimentConfig().replace(
        strategy="flclustering-fedavg", select=9, rounds=10, dp="central", dp_epsilon=budget, seed=2
    )
    result = run_local(config)
    assert [r["round"] for r in result.rounds] == [0, 1, 2]
    assert result.rounds[-1]["epsilon"] <= budget
    assert result.privacy["stopped"].startswith(
        "stopped before round 3: the privacy budget is spent"
    )
    assert result.final["epsilon"] == result.rounds[-1]["epsilon"]
    with pytest.raises(ConfigError, match="no round can run"):
        run_local(config.replace(dp_epsilon=0.5))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"strategy": "trimmed-mean"}, "has a derived sensitivity for"),
        ({"strategy": "qffl"}, "has a derived sensitivity for"),
        ({"strategy": "alpha-fedavg"}, "has a derived sensitivity for"),
        ({"personalise": True}, "--personalise is not covered"),
        ({"dp_noise": math.nan}, "--dp-noise"),
        ({"dp_clip": 0}, "--dp-clip"),
        ({"dp_delta": 0.5}, "--dp-delta"),
        ({"dp_epsilon": -1}, "--dp-epsilon"),
    ],
)
def test_settings_refuse_what_is_not_covered(changes, message):
    with pytest.raises(ConfigError, match=message):
        ExperimentConfig().replace(dp="central", **changes)


def test_adaptive_clipping_is_central_and_he_needs_distributed_noise():
    with pytest.raises(ConfigError, match="--dp central"):
        ExperimentConfig().replace(dp="local", dp_clip_quantile=0.5)
    with pytest.raises(ConfigError, match="distributed DP"):
        ExperimentConfig().replace(dp="central", strategy="fedavg", secure="he")


@pytest.mark.slow  # runs a federation: see tests/conftest.py
def test_a_round_that_draws_nobody_releases_and_spends_nothing():
    # 6 participants in 3 clusters, 1 a round: each member drawn with rate 1/6, so a
    # round draws nobody a third of the time.
    config = ExperimentConfig().replace(
        strategy="flclustering-fedavg",
        participants=6,
        select=1,
        rounds=8,
        dp="central",
        dp_clip=0.01,
        seed=1,
    )
    result = run_local(config)
    empty = [r for r in result.rounds if not r["selection"]]
    ran = [r for r in result.rounds if r["selection"]]
    assert empty and ran
    assert all("dp_rate" not in r for r in empty) and all(r["dp_rate"] == 1 / 6 for r in ran)
    assert result.privacy["rounds"] == len(ran)
    assert result.privacy["epsilon"] == pytest.approx(
        epsilon_of([Step(1.0, 1 / 6, len(ran))], 1e-5)
    )
    previous = 0.0
    for r in result.rounds:  # epsilon spent so far, carried through the empty rounds
        assert r["epsilon"] >= previous
        assert (r["epsilon"] == previous) == (not r["selection"])
        previous = r["epsilon"]
