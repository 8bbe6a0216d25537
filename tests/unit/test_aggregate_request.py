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
