"""The typed round record writes exactly the JSON each command has always written."""

from __future__ import annotations

import json

from services.core.record import ORDER, Layout, RoundRecord


def test_each_layout_round_trips_with_its_keys_in_order():
    values = {
        "round": 3,
        "model_version": 4,
        "selected": 5,
        "mean_accuracy": 0.5,
        "mean_loss": 1.25,
        "group_accuracy": {0: 0.25, 1: 0.75},
        "cluster_weights": {0: 1.0},
        "rejected_by": {"norm": 1},
        "selection": {"7": 1},
        "failed_clusters": {1: 2},
        "train_loss": 0.5,
        "attack_fired": False,
        "duration_s": 2.0,
    }
    for layout, order in ORDER.items():
        data = {k: values[k] for k in order if k in values}
        record = RoundRecord.from_dict(json.loads(json.dumps(data)), layout)
        out = record.to_dict()
        if layout is Layout.SERVICE:  # the clusterer's history always has both maps
            data.setdefault("cluster_weights", {})
        assert json.dumps(out) == json.dumps(data), layout


def test_unknown_keys_are_kept_and_absent_fields_are_not_written():
    record = RoundRecord.from_dict({"round": 1, "later_field": [1]}, Layout.LOCAL)
    assert record.to_dict() == {"round": 1, "later_field": [1]}
    assert RoundRecord(2, merge_refused="too far").failed and not RoundRecord(2).failed
