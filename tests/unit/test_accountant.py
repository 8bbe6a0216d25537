"""The accountant against a second one: Google's dp-accounting (its RDP and PLD
accountants, written independently of Opacus's analysis the project reports from)."""

from __future__ import annotations

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from services.core.accountant import Ledger, Step, epsilon_of
from services.core.errors import ConfigError
from services.experiment import ExperimentConfig
from services.local import run_local


def _event(noise: float, rate: float, count: int) -> dp_accounting.DpEvent:
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise)), count
    )


def google_rdp(steps: list[Step], delta: float) -> float:
    accountant = rdp_privacy_accountant.RdpAccountant()
    for s in steps:
        accountant.compose(_event(s.noise, s.rate, s.count))
    return float(accountant.get_epsilon(delta))


def google_pld(steps: list[Step], delta: float) -> float:
    accountant = pld_privacy_accountant.PLDAccountant()
    for s in steps:
        accountant.compose(_event(s.noise, s.rate, s.count))
    return float(accountant.get_epsilon(delta))


# Central DP's rounds (tens, rates 0.1-0.5) and DP-SGD's steps (thousands, small rates).
CASES = [
    [Step(1.0, 0.1, 30)],
    [Step(0.8, 0.3, 10)],
    [Step(2.0, 1.0, 20)],
    [Step(1.1, 0.01, 3000)],
    [Step(1.0, 0.1, 10), Step(1.5, 0.2, 10)],  # a mechanism that changed midway
]


@pytest.mark.parametrize(
    "steps", CASES, ids=lambda s: "+".join(f"{x.noise}/{x.rate}/{x.count}" for x in s)
)
def test_epsilon_agrees_with_a_second_accountant(steps):
    ours = epsilon_of(steps, 1e-5)
    rdp = google_rdp(steps, 1e-5)
    pld = google_pld(steps, 1e-5)
    # The same bound (RDP of the sampled Gaussian) by two codes: within 2 per cent (they
    # differ in their orders and in the RDP-to-(epsilon, delta) conversion).
    assert ours == pytest.approx(rdp, rel=0.02)
    # PLD accounting is tighter than any RDP bound, and not by much here: ours is an upper
    # bound of the true epsilon, never below it.
    assert pld <= ours * 1.001
    assert ours <= pld * 1.25


@pytest.mark.slow  # runs a federation: see tests/conftest.py
def test_a_run_reports_the_epsilon_of_the_mechanism_it_ran():
    config = ExperimentConfig().replace(
        strategy="flclustering-fedavg",
        participants=60,
        select=12,
        rounds=3,
        dp="central",
        dp_noise=1.2,
        dp_clip=2.0,
    )
    result = run_local(config)
    # 60 members in 3 clusters, 12 a round: each cluster expects 4, at rate 4 / its size.
    sizes = {c: sum(1 for p in result.clusters if p["cluster"] == c) for c in range(3)}
    rates = {str(c): 4 / n for c, n in sizes.items()}
    assert result.privacy["rates"] == pytest.approx(rates)
    rate = max(rates.values())  # the accountant takes the largest
    for r, record in enumerate(result.rounds, start=1):
        assert record["dp_noise"] == 1.2 and record["dp_rate"] == pytest.approx(rate)
        assert record["epsilon"] == pytest.approx(google_rdp([Step(1.2, rate, r)], 1e-5), rel=0.02)
    assert result.privacy["epsilon"] == result.rounds[-1]["epsilon"]


def test_the_ledger_refuses_past_its_budget_and_reads_back():
    ledger = Ledger(1e-5, 5.0)
    step = [Step(1.0, 0.2)]
    spent = 0
    while not ledger.refuses(step):
        ledger.spend(step)
        spent += 1
    assert ledger.epsilon <= 5.0 < ledger.after(step)
    assert epsilon_of([Step(1.0, 0.2, spent)], 1e-5) <= 5.0
    assert epsilon_of([Step(1.0, 0.2, spent + 1)], 1e-5) > 5.0
    assert "over --dp-epsilon 5" in ledger.refuses(step)
    again = Ledger.from_json(ledger.to_json())
    assert again.epsilon == ledger.epsilon and again.budget == 5.0


@pytest.mark.parametrize(
    "make",
    [
        lambda: Step(float("nan"), 0.1),
        lambda: Step(1.0, 0.0),
        lambda: Step(1.0, 1.5),
        lambda: Ledger(0.0),
        lambda: Ledger(1e-5, float("nan")),
    ],
)
def test_bad_mechanisms_are_refused(make):
    with pytest.raises(ConfigError):
        make()
