"""Colluding small-step attacks against their papers' definitions, on small random inputs."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from statistics import NormalDist

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from services.core.defence import DefenceConfig
from services.core.errors import ConfigError
from services.participant.adversary import AttackSettings
from services.participant.attacks import AttackConfig, View, build_attack
from services.participant.collusion import (
    GAMMA_CAP,
    Collusion,
    alie,
    alie_z,
    assumed_defence,
    defence_aware,
    evasion,
    fitted,
    ipm,
    jittered,
    median_distance,
    min_max,
    min_sum,
    perturbation,
    rehearsal,
    steer,
)


@st.composite
def honest_sets(draw, min_k: int = 1, max_k: int = 6):
    k = draw(st.integers(min_k, max_k))
    d = draw(st.integers(1, 12))
    values = st.floats(-5, 5, width=32, allow_subnormal=False)
    rows = draw(st.lists(st.lists(values, min_size=d, max_size=d), min_size=k, max_size=k))
    return torch.tensor(np.array(rows, dtype=np.float32))


def test_alie_z_follows_the_paper():
    # s = floor(n/2 + 1) - f; z = Phi^-1((n - s) / n)
    for n, f in [(50, 12), (20, 4), (10, 2), (10, 3), (5, 1)]:
        s = int(n / 2 + 1) - f
        assert alie_z(n, f) == pytest.approx(NormalDist().inv_cdf((n - s) / n))
    assert alie_z(10, 2) == pytest.approx(0.2533, abs=1e-4)
    assert alie_z(4, 0) == 0.0  # (n - s) / n = 0.25: no z moves the mean unnoticed
    with pytest.raises(ConfigError):
        alie_z(3, 4)


@settings(max_examples=100, deadline=None)
@given(honest_sets(), st.floats(0, 3))
def test_alie_is_mean_minus_z_std_per_coordinate(h, z):
    x = h.double().numpy()
    want = x.mean(0) - z * x.std(0)  # numpy's std: the population one
    np.testing.assert_allclose(alie(h, z).double().numpy(), want, rtol=1e-4, atol=1e-4)


@settings(max_examples=100, deadline=None)
@given(honest_sets(), st.floats(0, 10))
def test_ipm_is_minus_epsilon_times_the_mean(h, eps):
    got = ipm(h, eps)
    torch.testing.assert_close(got, -eps * h.mean(0), rtol=1e-5, atol=1e-5)
    mean = h.mean(0).double()
    if eps > 1e-3 and float(mean.norm()) > 1e-3:
        assert float(got.double() @ mean) < 0  # points against the honest mean


def naive_sq(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a - b) ** 2).sum())


@settings(max_examples=80, deadline=None)
@given(honest_sets(min_k=2), st.sampled_from(["std", "unit", "sign"]))
def test_min_max_stays_within_the_honest_spread_and_is_the_largest(h, kind):
    x = h.double().numpy()
    crafted, gamma = min_max(h, kind)
    bound = max(naive_sq(a, b) for a in x for b in x)
    worst = max(naive_sq(crafted.double().numpy(), a) for a in x)
    assert worst <= bound * (1 + 1e-6) + 1e-6
    p = perturbation(h, kind).double().numpy()
    if np.abs(p).max() > 1e-3 and bound > 1e-3:
        beyond = x.mean(0) + (gamma * 1.01 + 1e-3) * p  # a little more would be seen
        assert max(naive_sq(beyond, a) for a in x) > bound * (1 - 1e-6)


@settings(max_examples=80, deadline=None)
@given(honest_sets(min_k=2), st.sampled_from(["std", "unit", "sign"]))
def test_min_sum_stays_within_the_honest_sums_and_is_the_largest(h, kind):
    x = h.double().numpy()
    crafted, gamma = min_sum(h, kind)
    bound = max(sum(naive_sq(a, b) for b in x) for a in x)
    total = sum(naive_sq(crafted.double().numpy(), a) for a in x)
    assert total <= bound * (1 + 1e-6) + 1e-6
    p = perturbation(h, kind).double().numpy()
    if np.abs(p).max() > 1e-3 and bound > 1e-3:
        beyond = x.mean(0) + (gamma * 1.01 + 1e-3) * p
        assert sum(naive_sq(beyond, a) for a in x) > bound * (1 - 1e-6)


def test_one_colluder_alone_sends_its_honest_delta_under_min_max():
    h = torch.tensor([[1.0, -2.0, 3.0]])
    crafted, gamma = min_max(h)
    assert gamma == 0.0 and torch.equal(crafted, h[0])


def craft(cfg: AttackConfig, h: torch.Tensor, n: int) -> torch.Tensor:
    """The delta a colluder sends (no jitter: no draw), through the attack's hook."""
    return build_attack(cfg).on_pooled(h, View(0, n, torch.Generator()))


def test_craft_uses_the_configured_strength():
    h = torch.randn(4, 20, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(craft(AttackConfig("ipm", epsilon=2.0), h, 15), -2.0 * h.mean(0))
    z = alie_z(15, 4)
    torch.testing.assert_close(craft(AttackConfig("alie"), h, 15), alie(h, z))
    torch.testing.assert_close(craft(AttackConfig("alie", z=1.5), h, 15), alie(h, 1.5))
    torch.testing.assert_close(craft(AttackConfig("min-max"), h, 15), min_max(h)[0])
    torch.testing.assert_close(craft(AttackConfig("min-sum"), h, 15), min_sum(h)[0])


def test_each_colluder_jitters_from_its_own_stream():
    h = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    attack = build_attack(AttackConfig("ipm", jitter=0.5))
    sent = attack.on_pooled(h, View(0, 15, torch.Generator().manual_seed(7)))
    want = jittered(-0.1 * h.mean(0), h, 0.5, torch.Generator().manual_seed(7))
    torch.testing.assert_close(sent, want)


def test_settings_fire_colluding_attacks_every_round_and_loud_ones_every_fifth():
    assert AttackSettings(attack="alie").config().every == 1
    assert (
        build_attack(AttackSettings(attack="alie").config()).describe()
        == "alie, z from n and f, every 1 rounds"
    )
    assert AttackSettings(attack="scaling").config().every == 5
    assert AttackSettings(attack="ipm", attack_every=3).config().every == 3
    cfg = AttackSettings(attack="min-max", attack_perturbation="unit").config()
    attack = build_attack(cfg)
    assert attack.pools_update and attack.crafts_update(0) and cfg.perturbation == "unit"
    lying = AttackSettings(attack="lying-evaluation", attack_lie=1.0).config()
    liar = build_attack(lying)
    assert not liar.pools_update and not liar.crafts_update(4) and lying.lie == 1.0
    assert liar.on_report({"accuracy": 0.3}, View(0, 15, torch.Generator())) == {"accuracy": 1.0}
    with pytest.raises(ConfigError):
        AttackConfig("min-sum", perturbation="sideways")
    with pytest.raises(ConfigError):
        AttackConfig("lying-evaluation", lie=1.5)


def test_attackers_of_one_process_pool_their_deltas():
    """Three attacker threads, one enlisted late: all get the same pool of three."""
    pool = Collusion(grace_s=0.05, timeout_s=10)
    got: dict[str, torch.Tensor] = {}
    for who in ("a", "b", "c"):
        pool.enlist(7, who)

    def attacker(who: str, value: float) -> None:
        got[who] = pool.pool(7, who, torch.full((2,), value))

    threads = [
        threading.Thread(target=attacker, args=(w, v))
        for w, v in zip("abc", (1, 2, 3), strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    want = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    assert all(torch.equal(g, want) for g in got.values()) and len(got) == 3


def test_a_round_forgotten_while_its_colluder_waits_ends_its_wait():
    """--mode async: a slow colluder still pools round 4 when fast ones enlist in round 7,
    which forgets round 4; the slow one gets what its round pooled (it used to crash with
    a KeyError and take its process down)."""
    pool = Collusion(grace_s=0.05, timeout_s=10)
    pool.enlist(4, "slow")
    pool.enlist(4, "gone")  # its task never comes back
    got: list[torch.Tensor] = []
    waiter = threading.Thread(target=lambda: got.append(pool.pool(4, "slow", torch.ones(2))))
    waiter.start()
    time.sleep(0.2)
    pool.enlist(7, "fast")
    waiter.join(timeout=5)
    assert not waiter.is_alive() and torch.equal(got[0], torch.ones(1, 2))


@settings(max_examples=100, deadline=None)
@given(honest_sets(min_k=2), st.floats(0.01, 2))
def test_jitter_moves_each_copy_by_jitter_times_the_median_distance(h, jitter):
    x = h.double().numpy()
    k = len(x)
    dists = [float(np.linalg.norm(x[i] - x[j])) for i in range(k) for j in range(k) if i != j]
    lower_median = sorted(dists)[(len(dists) - 1) // 2]
    assert median_distance(h) == pytest.approx(lower_median, rel=1e-3, abs=1e-3)
    crafted = h.mean(0)
    a = jittered(crafted, h, jitter, torch.Generator().manual_seed(1))
    b = jittered(crafted, h, jitter, torch.Generator().manual_seed(2))
    want = jitter * median_distance(h)
    assert float((a - crafted).norm()) == pytest.approx(want, rel=1e-3, abs=1e-4)
    if want > 1e-3 and h.shape[1] > 1:
        assert not torch.equal(a, b)  # each colluder its own noise
    assert jittered(crafted, h, 0.0, torch.Generator()) is crafted


def test_cluster_steering_sends_the_mean_pre_training_delta_then_minus_the_mean():
    h = torch.randn(3, 10, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(steer(h), h.mean(0))
    cfg = AttackSettings(attack="cluster-steering", attack_jitter=0.2).config()
    attack = build_attack(cfg)
    assert attack.pools_pretrain and attack.pools_update and cfg.lie == 0.0 and cfg.every == 1
    assert attack.describe() == "cluster-steering, reports accuracy 0.0, jitter 0.2, every 1 rounds"
    torch.testing.assert_close(craft(replace(cfg, jitter=0.0), h, 15), -h.mean(0))
    gen = torch.Generator().manual_seed(5)
    sent = attack.on_pretrain(h[0], View(-1, 15, gen), h)
    want = jittered(h.mean(0), h, 0.2, torch.Generator().manual_seed(5))
    torch.testing.assert_close(sent, want)
    assert attack.on_report({"accuracy": 0.9}, View(0, 15, gen)) == {"accuracy": 0.0}
    with pytest.raises(ConfigError):
        steer(torch.zeros(0, 3))


# ---- what the colluders know, and the defence-aware attacks -------------------------------

ROUND = torch.randn(10, 40, generator=torch.Generator().manual_seed(11))
MINE = (True, False, False, True, False, False, True, False, False, False)


def omniscient(size: int = 10, seed: int = 0, defence: DefenceConfig | None = None) -> View:
    """The view of an omniscient colluder of ROUND: every row known, MINE its colluders'."""
    gen = torch.Generator().manual_seed(seed)
    return View(0, size, gen, mine=MINE, clusters=(0,) * len(MINE), defence=defence)


def test_omniscient_colluders_craft_from_every_honest_delta_of_the_round():
    # ALIE over all ten rows, z from n = 10 and the three colluders (not the ten rows).
    sent = build_attack(AttackConfig("alie", knowledge="omniscient")).on_pooled(ROUND, omniscient())
    torch.testing.assert_close(sent, alie(ROUND, alie_z(10, 3)))
    assert not torch.allclose(sent, alie(ROUND[list(MINE)], alie_z(10, 3)))
    ipm_sent = build_attack(AttackConfig("ipm")).on_pooled(ROUND, omniscient())
    torch.testing.assert_close(ipm_sent, -0.1 * ROUND.mean(0))
    # cluster steering still lands the colluders together: their own mean pre-training delta
    steering = build_attack(AttackConfig("cluster-steering"))
    torch.testing.assert_close(
        steering.on_pretrain(ROUND[0], omniscient(), ROUND), ROUND[list(MINE)].mean(0)
    )


def test_omniscient_knowledge_is_refused_outside_local():
    from services.experiment import ExperimentConfig, SimulateConfig
    from services.participant.adversary import OMNISCIENT_LOCAL_ONLY
    from services.participant.settings import ParticipantConfig

    ExperimentConfig().replace(attack="alie", attack_knowledge="omniscient")  # local: fine
    with pytest.raises(ValueError, match="only flclustering local can simulate"):
        SimulateConfig().replace(attack="alie", attack_knowledge="omniscient")
    with pytest.raises(ValueError, match="only flclustering local can simulate"):
        ParticipantConfig(adversary=AttackSettings(attack="alie", attack_knowledge="omniscient"))
    assert "--attack-knowledge omniscient" in OMNISCIENT_LOCAL_ONLY
    with pytest.raises(ConfigError, match="unknown attack knowledge"):
        AttackConfig("alie", knowledge="everything")


@pytest.mark.parametrize("view", [omniscient(), View(0, 10, torch.Generator())])
def test_adaptive_sends_the_largest_gamma_the_rehearsed_defence_keeps(view):
    pooled = ROUND if view.mine is not None else ROUND[list(MINE)]
    plan = rehearsal(pooled, view, 0.0)
    crafted, gamma = defence_aware(pooled, plan)
    p = perturbation(pooled, "std")
    assert gamma > 0 and plan.keeps(crafted)
    torch.testing.assert_close(crafted, pooled.mean(0) + gamma * p)
    assert not plan.keeps(pooled.mean(0) + gamma * 1.01 * p)  # a little more is rejected
    # the copies the rehearsal sends stay clear of the near-twin screen
    twin = plan.defence.twin_factor
    assert twin is not None
    gaps = torch.cdist(plan.offsets, plan.offsets)[~torch.eye(len(plan.copies), dtype=torch.bool)]
    assert float(gaps.min()) > twin * median_distance(plan.honest)
    # the hook sends that delta, jittered from the colluder's own stream
    sent = build_attack(AttackConfig("adaptive")).on_pooled(pooled, replace(view))
    assert sent.shape == crafted.shape and not torch.equal(sent, crafted)
    length = evasion(plan.defence, 0.0) * median_distance(plan.honest)
    assert float((sent - crafted).norm()) == pytest.approx(length, rel=1e-3)


def test_adaptive_under_omniscience_rehearses_the_round_it_knows():
    plan = rehearsal(ROUND, omniscient(defence=DefenceConfig("median")), 0.0)
    assert plan.defence.rule == "median" and len(plan.copies) == 3
    torch.testing.assert_close(plan.honest, ROUND[[not m for m in MINE]])
    own = rehearsal(ROUND[:3], View(0, 10, torch.Generator()), 0.0)
    assert own.defence == assumed_defence() and own.copies == (0, 0, 0)


def test_adaptive_is_capped_when_the_defence_keeps_everything():
    fedavg = DefenceConfig("fedavg", 0.2, None, None, None)
    plan = rehearsal(ROUND, omniscient(defence=fedavg), 0.0)
    _, gamma = defence_aware(ROUND, plan)
    p = perturbation(ROUND, "std")
    cap = GAMMA_CAP * float(ROUND.double().norm(dim=1).median()) / float(p.double().norm())
    assert gamma == pytest.approx(cap)


def test_adaptive_steering_lands_among_everyone_when_omniscient_and_lies():
    attack = build_attack(AttackConfig("adaptive-steering", knowledge="omniscient", lie=0.1))
    assert attack.pools_pretrain and attack.pools_update
    sent = attack.on_pretrain(ROUND[0], omniscient(), ROUND)
    jitter = evasion(assumed_defence(), 0.0) * median_distance(ROUND)
    assert float((sent - ROUND.mean(0)).norm()) == pytest.approx(jitter, rel=1e-3)
    own = attack.on_pretrain(ROUND[0], View(-1, 10, torch.Generator()), ROUND[:3])
    assert float((own - ROUND[:3].mean(0)).norm()) < float((own - ROUND.mean(0)).norm())
    assert attack.on_report({"accuracy": 0.9}, omniscient()) == {"accuracy": 0.1}


def test_fitted_colluders_send_the_longest_delta_the_rehearsed_defence_keeps():
    """--attack-fit: colluders who know the defence's thresholds shorten their crafted delta
    until the defence they rehearse keeps it (a bound on length lets through whatever is
    just under it); a delta the defence keeps whole is sent whole."""
    view = omniscient()
    plan = rehearsal(ROUND, view, 0.0)
    crafted = ipm(ROUND, 10.0)  # -10 x the mean: far longer than any honest delta
    assert not plan.keeps(crafted)
    short, scale = fitted(crafted, plan)
    assert 0 < scale < 1 and plan.keeps(short)
    torch.testing.assert_close(short, scale * crafted)
    assert not plan.keeps(1.01 * short)  # a little longer is dropped
    fedavg = rehearsal(ROUND, omniscient(defence=DefenceConfig("fedavg", 0.2, None, None, None)), 0)
    assert fitted(crafted, fedavg) == (crafted, 1.0)
    # the hook sends the fitted delta, jittered past the near-twin screen
    attack = build_attack(AttackConfig("ipm", epsilon=10.0, knowledge="omniscient", fit=True))
    sent = attack.on_pooled(ROUND, omniscient())
    length = evasion(plan.defence, 0.0) * median_distance(plan.honest)
    assert float((sent - short).norm()) == pytest.approx(length, rel=1e-3)
    assert "fitted to the defence" in attack.describe()
