"""`flclustering local --mode async`: buffered asynchronous versions on the virtual clock."""

from __future__ import annotations

import pytest
import torch

from services.core.errors import ConfigError
from services.experiment import ExperimentConfig
from services.local import run_local

# A small model, so that tens of versions take seconds.
FAST = dict(mode="async", model="2nn", speed_spread=10)


def test_async_learns_digits():
    # Measured: mean 0.943, worst 0.923 at version 60 (0.83 at version 20).
    config = ExperimentConfig().replace(rounds=60, eval_every=20, **FAST)
    result = run_local(config)
    records = result.rounds
    assert [r["round"] for r in records] == [20, 40, 60]
    assert [r["model_version"] for r in records] == [20, 40, 60]
    assert result.clustering["purity"] == 1.0
    assert records[-1]["mean_accuracy"] > 0.9 and records[-1]["worst_accuracy"] > 0.85
    assert records[-1]["mean_accuracy"] > records[0]["mean_accuracy"]
    clocks = [r["clock_s"] for r in records]
    assert 0 < clocks[0] < clocks[1] < clocks[2]
    for r in records:  # the flclustering rule's buffers: 5 updates, one version each
        assert r["updates"] == 20 * 5
        # refused on arrival past --max-staleness; waiting in a buffer while other
        # clusters make versions ages an update further
        assert 0 < r["staleness_mean"] <= r["staleness_max"]
        assert r["dropouts"] == 0
    assert result.devices["mode"] == "async"


def test_an_update_staler_than_allowed_is_refused():
    # Slow participants (factors up to 20) come back after versions were made: with
    # --max-staleness 0 none of their updates is merged.
    config = ExperimentConfig().replace(
        participants=15,
        strategy="flclustering-fedavg",
        buffer_size=2,
        max_staleness=0,
        rounds=6,
        eval_every=3,
        **{**FAST, "speed_spread": 20},
    )
    records = run_local(config).rounds
    assert sum(r["stale"] for r in records) > 0
    assert [r["updates"] for r in records] == [6, 6]  # 3 versions of 2 updates each
    patient = run_local(config.replace(max_staleness=100)).rounds
    assert sum(r["stale"] for r in patient) == 0
    assert max(r["staleness_max"] for r in patient) > 0  # the same updates, merged


def test_async_is_deterministic_for_a_seed():
    config = ExperimentConfig().replace(rounds=10, eval_every=5, dropout=0.2, seed=4, **FAST)
    first, second = run_local(config), run_local(config)
    timing = {"duration_s", "clock_s"}  # wall time, and the clock's measured scale

    def steady(rounds: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in timing} for r in rounds]

    assert steady(first.rounds) == steady(second.rounds)
    assert sum(r["dropouts"] for r in first.rounds) > 0
    for a, b in zip(first.rounds, second.rounds, strict=True):  # the same virtual instants
        per_a = first.devices["seconds_per_step"]
        per_b = second.devices["seconds_per_step"]
        assert a["clock_s"] / per_a == pytest.approx(b["clock_s"] / per_b, rel=1e-9)
    assert all(torch.equal(first.weights[k], second.weights[k]) for k in first.weights)


@pytest.mark.parametrize("knowledge", ["own", "omniscient"])
def test_colluders_in_a_flush_pool_and_are_counted(knowledge):
    config = ExperimentConfig().replace(
        rounds=10,
        eval_every=10,
        attack="alie",
        attack_rate=0.2,
        attack_every=1,
        attack_knowledge=knowledge,
        **FAST,
    )
    (record,) = run_local(config).rounds
    assert record["attack_fired"] and record["attackers_selected"] > 0
    assert 0 < record["rejected_attackers"] <= record["attackers_selected"]
    assert sum(record["rejected_by"].values()) == record["rejected"]


def test_a_buffer_too_small_for_krum_is_refused():
    with pytest.raises(ConfigError, match="--buffer-size 3 is too small for krum"):
        run_local(ExperimentConfig().replace(strategy="flclustering-krum", buffer_size=3, **FAST))
    # 9 participants in 3 clusters: Multi-Krum at a byzantine fraction of 0.2 needs 5.
    small = ExperimentConfig().replace(participants=9, select=6, **FAST)
    with pytest.raises(ConfigError, match=r"cluster \d has \d participant.*at least 5"):
        run_local(small)
