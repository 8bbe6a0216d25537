"""Central differential privacy over real gRPC: the aggregator refuses a mechanism other
than its own and bad expected counts, and a federation spends its budget round by round,
records epsilon, exports it, and stops before the round that would exceed it."""

from __future__ import annotations

import grpc
import pytest

from services.common.pb.flclustering.v1 import aggregator_pb2 as agg_pb
from services.core.accountant import Step, epsilon_of

from .conftest import META, rpc_code
from .test_bad_input import messages, start_round, submit, unchanged

C = grpc.StatusCode
# A small bound: with 2 expected members per cluster the noise is z C p / 2 per coordinate,
# which a bound of 1 would make larger than the model's weights.
CENTRAL = {"dp": "central", "dp_noise": 2.0, "dp_clip": 0.01}


def test_the_aggregator_refuses_another_mechanism_and_bad_counts(federation_factory):
    fed, _, weights = start_round(federation_factory, aggregator_only=CENTRAL, **CENTRAL)

    def aggregate(privacy=None):
        request = agg_pb.AggregateRequest(round=0)
        if privacy is not None:
            request.privacy.CopyFrom(privacy)
        return rpc_code(lambda: fed.agg_stub.Aggregate(request, metadata=META, timeout=30))

    def central(noise=2.0, expected=None):
        return agg_pb.CentralPrivacy(noise_multiplier=noise, expected=expected or {0: 3.0})

    # No mechanism, or another noise multiplier than the aggregator adds: the clusterer
    # would account for noise that is not there.
    assert aggregate() == C.FAILED_PRECONDITION
    assert aggregate(central(noise=0.5)) == C.FAILED_PRECONDITION
    assert aggregate(central(noise=float("nan"))) == C.FAILED_PRECONDITION
    for bad in ({0: float("nan")}, {0: 0.0}, {0: -1.0}, {0: 1e9}, {-1: 3.0}):
        assert aggregate(central(expected=bad)) == C.INVALID_ARGUMENT, bad
    many = agg_pb.CentralPrivacy(noise_multiplier=2.0, expected={c: 1.0 for c in range(5000)})
    assert aggregate(many) == C.INVALID_ARGUMENT
    assert unchanged(fed)
    assert submit(fed, messages(weights)) == C.OK  # the round still takes the good update


def test_an_aggregator_without_dp_refuses_a_private_round(federation_factory):
    fed, _, _ = start_round(federation_factory)
    request = agg_pb.AggregateRequest(
        round=0, privacy=agg_pb.CentralPrivacy(noise_multiplier=1.0, expected={0: 3.0})
    )
    code = rpc_code(lambda: fed.agg_stub.Aggregate(request, metadata=META, timeout=30))
    assert code == C.FAILED_PRECONDITION
    assert unchanged(fed)


@pytest.mark.parametrize("strategy", ["flclustering-fedavg"])
def test_a_federation_spends_its_budget_and_stops(federation_factory, strategy):
    # 6 participants in 3 clusters, 6 a round: each cluster's rate is 1 (everyone, every
    # round), so each round is one Gaussian step with z = 2 and the budget allows two.
    budget = (epsilon_of([Step(2.0, 1.0, 2)], 1e-5) + epsilon_of([Step(2.0, 1.0, 3)], 1e-5)) / 2
    settings = {**CENTRAL, "dp_epsilon": budget}
    fed = federation_factory(
        settings, strategy=strategy, participants=6, select=6, rounds=5, clusters=3, **settings
    )
    fed.add_participants(0, 6, strategy=strategy)
    status = fed.wait_for(lambda s: s.done, timeout=240)
    history = list(status.history)
    assert [h.round for h in history] == [0, 1]
    assert status.stopped.startswith("stopped before round 2: the privacy budget is spent")
    for r, h in enumerate(history, start=1):
        assert h.dp_noise == 2.0 and h.dp_rate == 1.0 and h.selected == 6
        assert h.epsilon == pytest.approx(epsilon_of([Step(2.0, 1.0, r)], 1e-5))
        # sigma = z * C * max_c p_c / n_c: 3 clusters of 2 expected, even weights in
        # round 0, the fair merge's in round 1.
        assert h.dp_clip == 0.01 and h.dp_clipped == 6  # every update is longer
        assert len(h.cluster_weights) == 3 and not h.merge_refused
        p = max(h.cluster_weights.values())
        assert h.dp_sigma == pytest.approx(2.0 * 0.01 * p / 2)
    assert history[0].cluster_weights == pytest.approx({0: 1 / 3, 1: 1 / 3, 2: 1 / 3})
    clusterer = fed.clusterer.registry.get_sample_value("flclustering_dp_epsilon")
    assert clusterer == pytest.approx(history[-1].epsilon)
    registry = fed.aggregator.registry
    assert registry.get_sample_value("flclustering_dp_noise_sigma") == pytest.approx(
        history[-1].dp_sigma
    )
    assert registry.get_sample_value("flclustering_dp_clip_bound") == 0.01
    assert registry.get_sample_value("flclustering_dp_clipped_updates_total") == 12
