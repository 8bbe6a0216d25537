"""What an Aggregate call may weigh the merge with is checked before anything is touched."""

from __future__ import annotations

import math

import pytest

from services.aggregator.server import cluster_accuracies
from services.core.errors import WireError
from services.transport.limits import MAX_CLUSTERS


def test_accuracies_in_range_are_kept_as_they_came():
    assert cluster_accuracies({0: 0.5, 3: 1.0, 7: 0.0}) == {0: 0.5, 3: 1.0, 7: 0.0}


@pytest.mark.parametrize(
    ("given", "said"),
    [
        ({-1: 0.5}, "cluster ids must be in"),
        ({MAX_CLUSTERS: 0.5}, "cluster ids must be in"),
        ({0: math.nan}, "outside [0, 1]"),
        ({0: 1.5}, "outside [0, 1]"),
        ({0: -math.inf}, "outside [0, 1]"),
        ({c: 0.5 for c in range(MAX_CLUSTERS + 1)}, f"at most {MAX_CLUSTERS}"),
    ],
)
def test_a_bad_accuracy_is_invalid_argument_naming_it(given, said):
    with pytest.raises(WireError) as refused:
        cluster_accuracies(given)
    assert refused.value.code == "INVALID_ARGUMENT" and said in str(refused.value)


def test_async_flushes_are_named_clusters_and_rounds_take_none():
    """--mode async: the clusters to flush and every cluster, checked; in rounds, none."""
    from services.aggregator.server import buffers_request
    from services.common.pb.flclustering.v1 import aggregator_pb2 as pb
    from services.core.errors import StateError

    asked = pb.AggregateRequest(round=3, flush=[1], clusters=[0, 2])
    assert buffers_request(asked, True) == (frozenset({1}), (0, 1, 2))
    assert buffers_request(pb.AggregateRequest(round=3), False) == (None, ())
    with pytest.raises(StateError, match="same --mode"):
        buffers_request(asked, False)
    with pytest.raises(StateError, match="which clusters"):
        buffers_request(pb.AggregateRequest(round=3), True)
    for bad in ([-1], [MAX_CLUSTERS], [1, 1]):
        with pytest.raises(WireError) as refused:
            buffers_request(pb.AggregateRequest(round=3, flush=bad), True)
        assert refused.value.code == "INVALID_ARGUMENT"
    with pytest.raises(WireError):
        buffers_request(pb.AggregateRequest(round=3, flush=[0], abandon=True), True)
