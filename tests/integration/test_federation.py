"""A federation over real gRPC: it learns, and a dead participant does not hold a round."""

from __future__ import annotations

import time

from services.common.pb.flclustering.v1 import clusterer_pb2 as pb

from .conftest import META


def test_six_participants_learn_over_grpc(federation_factory):
    fed = federation_factory(participants=6, select=6, rounds=3, clusters=3)
    fed.add_participants(0, 3)
    fed.add_participants(3, 3)
    status = fed.wait_for(lambda s: s.done, timeout=240)
    accs = [h.mean_accuracy for h in status.history]
    assert len(accs) == 3
    assert accs[-1] > accs[0] + 0.1, accs
    assert all(h.received == h.selected == 6 for h in status.history)
    assert status.purity >= 0.99  # practical-noniid groups recovered
    assert status.model_version == 3
    assert [h.evaluated for h in status.history] == [6, 6, 6]


def test_dead_participant_does_not_hold_the_round(federation_factory):
    fed = federation_factory(
        strategy="fedavg",
        participants=6,
        select=6,
        rounds=3,
        round_timeout_s=3.0,
        liveness_s=1.0,
        eval_timeout_s=5.0,
    )
    fed.add_participants(0, 5)
    # The sixth participant joins, receives its training task, and dies.
    fed.stub.Join(
        pb.JoinRequest(participant_id="participant-00005", num_train=10, num_test=10, group=-1),
        metadata=META,
        timeout=10,
    )
    task = fed.stub.GetTask(
        pb.GetTaskRequest(participant_id="participant-00005", wait_s=20), metadata=META, timeout=30
    )
    assert task.kind == pb.TASK_KIND_TRAIN
    started = time.monotonic()
    status = fed.wait_for(lambda s: s.done, timeout=120)
    first = status.history[0]
    assert first.timed_out == 1 and first.received == 5
    assert first.duration_s < 3.0 + 5.0 + 3.0  # deadline + evaluation deadline + slack
    assert all(h.selected == 5 for h in status.history[1:])  # no longer live: not selected
    assert time.monotonic() - started < 60


def test_participants_reconnect_when_the_clusterer_restarts(federation_factory):

    from services.clusterer.server import build_service

    fed = federation_factory(
        strategy="fedavg", participants=3, select=3, rounds=6, round_timeout_s=20
    )
    fed.add_participants(0, 3, participants=3)
    fed.wait_for(lambda s: len(s.history) >= 2, timeout=120)
    # The clusterer dies (mid-round or between rounds) and comes back on the same port.
    old = fed.clusterer
    old.coordinator.shutdown()
    old.server.stop(0).wait()
    config = old.servicer.config.replace(port=old.port)
    fed.clusterer = build_service(config)
    fed.clusterer.server.start()
    fed.clusterer.coordinator.start()
    status = fed.wait_for(lambda s: s.done, timeout=180)
    # The participants re-joined the new clusterer, which went on from the aggregator's round.
    assert status.participants == 3
    assert status.history and status.history[0].round >= 2
    assert status.history[-1].round == 5
    assert status.history[-1].mean_accuracy > 0.2
