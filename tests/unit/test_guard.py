"""The aggregator's divergence guard (services/core/guard.py) and the state that
applies it: a refused merge keeps the version, says why, and survives a restart."""

from __future__ import annotations

from pathlib import Path

import torch

from services.aggregator.state import AggregatorState, PendingUpdate, RoundClose
from services.common.settings import DefenceSettings
from services.core.guard import MIN_STEPS, STEP_FACTOR, check_merge, remember
from services.core.models import build_model
from services.core.sanity import GROWTH
from services.core.strategies import STRATEGIES
from services.core.tensors import state_of

FEDAVG = STRATEGIES["fedavg"]


def test_a_merge_is_refused_when_non_finite_grown_or_far_beyond_the_recent_steps():
    base = torch.full((100,), 0.5)
    assert check_merge(base, base + 0.01, []).refused == ""
    nan = base.clone()
    nan[3] = float("nan")
    assert "non-finite" in check_merge(base, nan, []).refused
    assert "non-finite" in check_merge(base, base * float("inf"), [], bounds=False).refused
    huge = base.clone()
    huge[0] = GROWTH * 1.01
    assert "largest weight" in check_merge(base, huge, []).refused
    assert check_merge(base, huge, [], bounds=False).refused == ""  # --guard false
    step = torch.zeros(100)
    step[0] = 1.0  # a step of length 1
    recent = [1.0 / STEP_FACTOR * 0.9] * MIN_STEPS  # 1 is past STEP_FACTOR x their median
    assert "median of the last" in check_merge(base, base + step, recent).refused
    assert check_merge(base, base + step, recent[:-1]).refused == ""  # too few known
    assert check_merge(base, base + step, [0.1] * 5).refused == ""
    assert remember([1.0] * 5, 2.0) == [1.0] * 4 + [2.0]


def test_a_refused_merge_keeps_the_version_and_is_replayed_after_a_restart(tmp_path: Path):
    s = AggregatorState(state_of(build_model("cnn", (1, 8, 8), 10, seed=0)))
    d = s.versions[0].numel()
    w0 = s.versions[0].clone()
    s.begin_update("a", 0, 0)
    s.end_update(PendingUpdate("a", 0, 10, torch.full((d,), 1e30)), 0)
    report = s.aggregate(RoundClose(0, FEDAVG, {}, DefenceSettings(byzantine_fraction=0.0), 0.05))
    assert report.refused and "largest weight" in report.refused
    assert (report.version, s.version, s.open_round) == (0, 0, 1)
    assert torch.equal(s.versions[0], w0) and not s.pending
    s.save(tmp_path)
    again = AggregatorState(state_of(build_model("cnn", (1, 8, 8), 10, seed=0)))
    assert again.restore(tmp_path)
    replay = again.aggregate(RoundClose(0, FEDAVG, {}, DefenceSettings(), 0.05))
    assert replay.replayed and replay.refused == report.refused
