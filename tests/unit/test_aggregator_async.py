"""The aggregator's state in --mode async: buffers per cluster across versions, deltas
against each update's own base, staleness refused, and buffers that survive a restart."""

from __future__ import annotations

import pytest
import torch

from services.aggregator.state import AggregatorState, PendingUpdate, RoundClose
from services.common.settings import DefenceSettings
from services.core.errors import StaleError, StateError
from services.core.models import build_model
from services.core.strategies import STRATEGIES
from services.core.tensors import state_of

FEDAVG = STRATEGIES["fedavg"]
FLCLUSTERING = STRATEGIES["flclustering-fedavg"]
DEFENCE = DefenceSettings(byzantine_fraction=0.0)


def fresh(max_staleness: int = 2) -> AggregatorState:
    model = state_of(build_model("cnn", (1, 8, 8), 10, seed=0))
    return AggregatorState(model, keep_versions=3, max_staleness=max_staleness)


def add(
    state: AggregatorState, who: str, delta: torch.Tensor, cluster: int = 0, base: int = -1
) -> PendingUpdate:
    """An update trained from version `base` (-1: the newest), as the server builds it."""
    v = state.version if base < 0 else base
    state.begin_update(who, 99, v, cluster)  # the round does not matter in async
    update = PendingUpdate(who, cluster, 10, delta, base_version=v)
    state.end_update(update, 99)
    return update


def flush(state: AggregatorState, clusters: set[int], known: tuple[int, ...] = (0,)) -> object:
    close = RoundClose(
        state.open_round,
        FLCLUSTERING,
        {},
        DEFENCE,
        0.05,
        flush=frozenset(clusters),
        clusters=known,
    )
    return state.aggregate(close)


def test_only_the_full_clusters_buffer_is_flushed_with_its_share_of_the_weight():
    s = fresh()
    d = s.versions[0].numel()
    add(s, "a", torch.full((d,), 0.3), cluster=0)
    add(s, "b", torch.full((d,), 0.1), cluster=0)
    add(s, "c", torch.full((d,), 5.0), cluster=1)
    report = flush(s, {0}, known=(0, 1))
    # Cluster 0's mean delta (0.2), times its weight among both clusters (even: 0.5).
    assert report.version == 1 and sorted(report.merged) == ["a", "b"]
    assert torch.allclose(s.versions[1] - s.versions[0], torch.full((d,), 0.1))
    assert list(s.pending) == ["c"] and s.buffered() == {1: 1}
    # "a" may submit again (its slot was flushed); "c" may not (still buffered).
    add(s, "a", torch.zeros(d), cluster=0)
    with pytest.raises(StateError, match="buffer already"):
        s.begin_update("c", 0, s.version, 1)


def test_a_delta_is_against_its_own_base_and_shortened_by_its_staleness():
    s = fresh(max_staleness=3)
    d = s.versions[0].numel()
    add(s, "a", torch.full((d,), 1.0))
    flush(s, {0})  # version 1 = w0 + 1
    add(s, "b", torch.full((d,), 1.0))
    flush(s, {0})  # version 2 = w0 + 2
    w2 = s.versions[2].clone()
    # Trained from version 0 (two behind): its weights are w0 + 3, its delta against w0 is 3,
    # and it counts 1/sqrt(1 + 2).
    add(s, "c", torch.full((d,), 3.0), base=0)
    report = flush(s, {0})
    assert report.staleness == (2,)
    assert torch.allclose(s.versions[3] - w2, torch.full((d,), 3.0 / 3**0.5), atol=1e-5)


def test_too_stale_an_update_is_refused_at_upload_and_at_the_flush():
    s = fresh(max_staleness=1)
    d = s.versions[0].numel()
    add(s, "old", torch.full((d,), 1.0), cluster=1)  # waits in cluster 1's buffer
    for who in ("a", "b"):
        add(s, who, torch.full((d,), 0.1))
        flush(s, {0}, known=(0, 1))
    with pytest.raises(StaleError, match="2 versions behind"):
        s.begin_update("late", 0, 0, 0)
    before = s.versions[s.version].clone()
    report = flush(s, {1}, known=(0, 1))
    assert report.stale == 1 and report.updates == 0 and report.merged == ("old",)
    assert torch.equal(s.versions[s.version], before) and not s.pending


def test_buffers_survive_a_restart_and_a_flush_is_not_taken_twice(tmp_path):
    s = fresh()
    d = s.versions[0].numel()
    for who, c in (("a", 0), ("b", 0), ("c", 1)):
        u = add(s, who, torch.full((d,), 0.2), cluster=c)
        s.persist(u, 0, tmp_path)
    flush(s, {0}, known=(0, 1))
    s.save(tmp_path)
    u = add(s, "d", torch.full((d,), 0.4), cluster=1, base=0)
    s.persist(u, 0, tmp_path)
    # A crash before a flushed file was deleted: state.json names it, it is not restored.
    pending = tmp_path / "pending"
    taken = pending / f"{s.consumed[0]}.safetensors"
    assert not taken.exists()
    taken.write_bytes((pending / f"{s.pending['c'].key}.safetensors").read_bytes())
    back = fresh()
    assert back.restore(tmp_path)
    assert back.version == 1 and back.open_round == 1
    assert sorted(back.pending) == ["c", "d"] and not taken.exists()
    assert back.pending["d"].base_version == 0 and back.pending["c"].base_version == 0
    assert torch.allclose(back.pending["d"].delta, torch.full((d,), 0.4))
    again = RoundClose(0, FLCLUSTERING, {}, DEFENCE, 0.05, flush=frozenset({0}), clusters=(0, 1))
    assert back.aggregate(again).replayed  # asked again for the flush made before the crash
    nxt = add(back, "e", torch.zeros(d), cluster=1)
    assert nxt.base_version == 1
    back.persist(nxt, 0, tmp_path)
    assert nxt.key.startswith("u5-")  # numbering goes on after the restored files


@pytest.mark.parametrize("base", [-1, -(2**62), 5, 2**62])
def test_a_base_version_before_zero_or_after_the_newest_is_refused(base):
    s = fresh()
    with pytest.raises(StateError, match="the newest is 0"):
        s.begin_update("a", 0, base, 0)
    assert not s.pending  # nothing reserved: the same participant may try again
    s.begin_update("a", 0, 0, 0)
