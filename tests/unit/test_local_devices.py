"""Simulated devices in synchronous local runs: slowness factors, the virtual clock,
over-selection and dropouts (--speed-spread, --dropout, --over-select)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import services.local as local
from services.cli import main
from services.core.devices import drops, speed_factors
from services.core.merge import local_steps
from services.core.virtual_clock import VirtualClock, first_arrivals, over_selected
from services.experiment import ExperimentConfig
from services.inprocess import build_participants
from services.local import run_local
from services.participant.partition import federation_data


def task_units(config: ExperimentConfig) -> np.ndarray:
    """Each participant's task on the virtual clock, in units (factor x SGD steps)."""
    fed, train = config.federation, config.training
    people = build_participants(config, federation_data(fed, config.data))
    steps = local_steps([p.samples for p in people], train.local_epochs, train.batch_size)
    return speed_factors(fed.participants, config.devices.speed_spread, fed.seed) * steps


def round_seconds(rounds: list[dict]) -> list[float]:
    """Each round's duration on the virtual clock (the record keeps it cumulative)."""
    clocks = [r["clock_s"] for r in rounds]
    return [b - a for a, b in zip([0.0, *clocks[:-1]], clocks, strict=True)]


def test_over_selection_and_first_arrivals():
    assert over_selected(15, 0.2) == 18  # 15 x 1.2 is 18.000000000000004 in floats
    assert over_selected(15, 0.0) == 15 and over_selected(4, 0.5) == 6
    assert first_arrivals({5: 1.0, 1: 3.0, 2: 1.0, 9: 0.5}, 3) == [2, 5, 9]  # tie: lower id
    assert first_arrivals({1: 2.0}, 3) == [1]


def test_the_clock_is_calibrated_once_on_median_compute():
    clock = VirtualClock(3, 1.0, 0.0, seed=0)
    clock.measure(10.0, 10)  # a warm-up outlier
    clock.measure(0.2, 10)
    clock.measure(0.3, 10)
    clock.calibrate()
    clock.measure(100.0, 1)  # after calibration: ignored
    assert clock.seconds_per_step == pytest.approx(0.03)
    assert clock.seconds(clock.units(1, 20)) == pytest.approx(0.6)


def test_factors_are_recorded_and_a_round_lasts_until_its_slowest_update():
    config = ExperimentConfig().replace(participants=12, select=6, rounds=3, speed_spread=10)
    result = run_local(config)
    devices = result.devices
    factors = speed_factors(12, 10, config.federation.seed)
    assert devices["mode"] == "sync" and devices["speed_spread"] == 10
    assert devices["factors"] == {str(i): round(float(f), 3) for i, f in enumerate(factors)}
    assert max(factors) / min(factors) > 3  # heterogeneous enough to tell rounds apart
    units, per_step = task_units(config), devices["seconds_per_step"]
    assert per_step > 0
    for record, seconds in zip(result.rounds, round_seconds(result.rounds), strict=True):
        used = [int(i) for i in record["selection"]]  # no dropout, no over-selection
        assert record["updates"] == len(used) == 6
        assert record["stragglers"] == record["dropouts"] == 0
        assert seconds == pytest.approx(max(units[used]) * per_step, rel=1e-9)


def test_over_selection_closes_at_select_updates_and_counts_stragglers():
    config = ExperimentConfig().replace(
        participants=12, select=4, over_select=0.5, rounds=3, speed_spread=10
    )
    result = run_local(config)
    units, per_step = task_units(config), result.devices["seconds_per_step"]
    for record, seconds in zip(result.rounds, round_seconds(result.rounds), strict=True):
        selected = [int(i) for i in record["selection"]]
        assert len(selected) == 6  # ceil(4 x 1.5)
        assert record["updates"] == 4 and record["stragglers"] == 2
        # it closed when the 4th fastest of the selected arrived
        assert seconds == pytest.approx(sorted(units[selected])[3] * per_step, rel=1e-9)


def test_dropped_tasks_are_counted_and_never_aggregated(monkeypatch):
    config = ExperimentConfig().replace(
        participants=12, select=6, rounds=4, dropout=0.3, speed_spread=2
    )
    trained: list[list[int]] = []  # per round, whose updates were trained
    setup = {}

    def prepare(c):
        setup["fl"] = fl = real_prepare(c)
        return fl

    def local_train(model, data, train, round_, generator, privacy=None):
        who = next(p.index for p in setup["fl"].people if p.gen is generator)
        while len(trained) <= round_:
            trained.append([])
        trained[round_].append(who)
        return real_train(model, data, train, round_, generator, privacy=privacy)

    real_prepare, real_train = local.prepare, local.local_train
    monkeypatch.setattr(local, "prepare", prepare)
    monkeypatch.setattr(local, "local_train", local_train)
    result = run_local(config)
    tasks = dict.fromkeys(range(12), 0)
    seed = config.federation.seed
    for record, sent in zip(result.rounds, trained, strict=True):
        selected = [int(i) for i in record["selection"]]
        dropped = set()
        for i in selected:  # the devices' seeded draws, task by task
            if drops(i, tasks[i], 0.3, seed):
                dropped.add(i)
            tasks[i] += 1
        assert record["dropouts"] == len(dropped)
        assert record["updates"] == len(selected) - len(dropped)
        assert sorted(sent) == sorted(set(selected) - dropped)
    assert sum(r["dropouts"] for r in result.rounds) > 0


def test_cli_writes_the_devices_block_and_the_clock(tmp_path):
    out = tmp_path / "run"
    argv = ["local", "--rounds", "2", "--participants", "9", "--select", "6"]
    argv += ["--speed-spread", "4", "--dropout", "0.1", "--out", str(out)]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    devices = results["devices"]
    assert devices["mode"] == "sync" and devices["dropout"] == 0.1
    assert len(devices["factors"]) == len(devices["task_s"]) == 9
    assert all(1 <= f <= 4 for f in devices["factors"].values())
    clocks = [r["clock_s"] for r in results["rounds"]]
    assert 0 < clocks[0] <= clocks[1]
    header = (out / "rounds.csv").read_text().splitlines()[0].split(",")
    assert {"clock_s", "stragglers", "dropouts"} <= set(header)
