"""Admission of calls in flight: per identity, per method, and per role."""

from __future__ import annotations

from services.aggregator.server import MODEL_READS, policy
from services.transport.credentials import Identity
from services.transport.gate import _Admission

CLUSTERER = Identity("clusterer", "clusterer")
OPERATORS = [Identity("operator", name) for name in ("alice", "bob")]


def test_operators_exporting_models_never_take_the_clusterers_slots():
    admission = _Admission(policy(max_workers=64))
    # Operators hold every GetModel call they can (one between them), then the clusterer
    # still gets all of its own.
    assert admission.enter(OPERATORS[0], "GetModel") is None
    refused = admission.enter(OPERATORS[1], "GetModel")
    assert refused is not None and "operators have 1" in refused
    for _ in range(MODEL_READS):
        assert admission.enter(CLUSTERER, "GetModel") is None
    assert admission.enter(CLUSTERER, "GetModel") is not None  # its own limit stands
    # A slot given back is free again, for that role only.
    admission.leave(OPERATORS[0], "GetModel")
    assert admission.enter(OPERATORS[1], "GetModel") is None
    admission.leave(CLUSTERER, "GetModel")
    assert admission.enter(OPERATORS[0], "GetModel") is not None
    assert admission.enter(CLUSTERER, "GetModel") is None
