"""Simulated devices on the participant's side: the wait after training, the lost tasks."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch
from prometheus_client import CollectorRegistry

from services.common.settings import DevicesSettings, TrainingSettings
from services.core.devices import drops, speed_factors
from services.participant.attacks import AttackConfig
from services.participant.datasets import load_dataset
from services.participant.examples import TensorExamples
from services.participant.heterogeneity import SimulatedDevice, simulated_devices
from services.participant.metrics import ParticipantMetrics
from services.participant.training import local_train
from services.participant.worker import LocalData, Participant, TaskDropped, WorkerSettings

DATA = load_dataset("digits")


def participant(
    device: SimulatedDevice,
    stop: threading.Event | None = None,
    registry: CollectorRegistry | None = None,
) -> Participant:
    """A participant on 300 digits; no task here calls the clusterer (stub and store unset)."""
    local = LocalData(
        TensorExamples(DATA.x_train[:300], DATA.y_train[:300]),
        TensorExamples(DATA.x_test[:50], DATA.y_test[:50]),
        DATA.input_shape,
        10,
    )
    return Participant(
        device.index,
        f"participant-{device.index}",
        local,
        WorkerSettings("cnn", torch.device("cpu"), None, seed=device.seed),
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        AttackConfig(),
        stop or threading.Event(),
        ParticipantMetrics(registry or CollectorRegistry()),
        simulated=device,
    )


def test_a_participant_waits_its_factor_less_one_times_its_compute(caplog):
    """Factor 3: after training for t seconds (measured around the training), the
    participant waits 2t more before it would upload; its factor is logged once and
    exported."""
    registry = CollectorRegistry()
    with caplog.at_level(logging.INFO, logger="services.participant.worker"):
        p = participant(SimulatedDevice(2, factor=3.0), registry=registry)
    said = [r.getMessage() for r in caplog.records if "simulated device" in r.getMessage()]
    assert said == ["participant-2: simulated device 3x slower than the process, dropout 0"]
    factor = {"participant": "2"}
    assert registry.get_sample_value("flclustering_participant_slowness_factor", factor) == 3.0
    cfg = TrainingSettings(local_epochs=8, batch_size=10)
    result = local_train(p.model, p.local.train, cfg, 0, p.gen)
    assert result.seconds > 0.05  # enough compute that the clock's jitter is small beside it
    started = time.perf_counter()
    assert p._as_simulated(0, result.seconds) is True
    waited = time.perf_counter() - started
    assert 2 * result.seconds <= waited < 2 * result.seconds * 1.1 + 0.2
    assert p.trained == 1


def test_a_fast_device_does_not_wait(caplog):
    """Factor 1 (no --speed-spread): no wait, nothing logged, the gauge at 1; a stopping
    process still delivers what it trained, as the participant without simulated devices."""
    registry = CollectorRegistry()
    stop = threading.Event()
    stop.set()
    with caplog.at_level(logging.INFO, logger="services.participant.worker"):
        p = participant(SimulatedDevice(0), stop, registry)
    assert not [r for r in caplog.records if "simulated device" in r.getMessage()]
    started = time.perf_counter()
    assert p._as_simulated(0, 30.0) is True
    assert time.perf_counter() - started < 0.05
    factor = {"participant": "0"}
    assert registry.get_sample_value("flclustering_participant_slowness_factor", factor) == 1.0


def test_stopping_cuts_the_wait_short_and_sends_nothing():
    """A process stopped while its slow device waits gives up at once, without uploading."""
    stop = threading.Event()
    p = participant(SimulatedDevice(1, factor=1000.0), stop)
    threading.Timer(0.2, stop.set).start()
    started = time.perf_counter()
    assert p._as_simulated(0, 10.0) is False  # a 9,990 s wait
    assert time.perf_counter() - started < 2.0


def test_a_participant_drops_the_tasks_drops_draws():
    """Dropout 0.4: TRAIN task n is lost (TaskDropped: trained, not uploaded) exactly when
    drops(index, n) says so; the others upload. The count runs over its TRAIN tasks."""
    device = SimulatedDevice(5, dropout=0.4, seed=3)
    p = participant(device)
    lost = []
    for n in range(40):
        try:
            assert p._as_simulated(n, 0.0) is True
        except TaskDropped as exc:
            assert f"TRAIN task {n}," in str(exc)
            lost.append(n)
    assert lost == [n for n in range(40) if drops(5, n, 0.4, 3)]
    assert 6 <= len(lost) <= 26  # about 16 of 40
    assert p.trained == 40


def test_hosted_participants_get_the_federations_factors():
    """Whichever process hosts participant i, its factor is the federation's i-th (seeded by
    --seed), and its dropout draws are its own."""
    devices = DevicesSettings(speed_spread=10.0, dropout=0.2)
    factors = speed_factors(8, 10.0, 7)
    alone = simulated_devices(range(3, 6), 8, devices, 7)
    every = simulated_devices(range(8), 8, devices, 7)
    assert [d.factor for d in alone] == pytest.approx(factors[3:6].tolist())
    assert alone == every[3:6]
    assert all(1 <= d.factor <= 10 for d in every) and len({d.factor for d in every}) == 8
    assert all(d.heterogeneous for d in every)
    assert [d.loses(n) for d in alone for n in range(20)] == [
        drops(i, n, 0.2, 7) for i in range(3, 6) for n in range(20)
    ]
    plain = simulated_devices(range(4), 4, DevicesSettings(), 7)
    assert [d.factor for d in plain] == [1.0] * 4
    assert not any(d.heterogeneous or d.loses(n) for d in plain for n in range(100))
