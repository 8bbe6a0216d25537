"""Accuracy figures and clustering purity."""

from __future__ import annotations

import pytest

from services.common.figures import accuracy_summary, purity


def test_accuracy_summary():
    s = accuracy_summary([0.1] + [0.9] * 9 + [1.0] * 10)
    assert s.worst == 0.1
    assert s.worst_decile == pytest.approx((0.1 + 0.9) / 2)  # 10% of 20 = 2
    assert s.mean == pytest.approx((0.1 + 8.1 + 10) / 20)
    assert accuracy_summary([0.5, 0.5]).std == 0.0
    with pytest.raises(ValueError):
        accuracy_summary([])


def test_purity():
    assert purity([0, 0, 1, 1], [5, 5, 7, 7]) == 1.0
    assert purity([0, 0, 0, 0], [1, 1, 2, 2]) == 0.5
    assert purity([0, 1, 1, 1], [0, 0, 1, 1]) == 0.75
    with pytest.raises(ValueError):
        purity([0], [0, 1])
