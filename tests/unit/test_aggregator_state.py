"""The aggregator's state: rounds, duplicates, and surviving a restart through safetensors."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from services.aggregator.state import AggregatorState, PendingUpdate, RoundClose, RoundReport
from services.common.settings import DefenceSettings
from services.core.errors import NotFoundError, SpecMismatchError, StateError
from services.core.models import build_model
from services.core.strategies import STRATEGIES
from services.core.tensors import state_of

FEDAVG = STRATEGIES["fedavg"]
FLCLUSTERING = STRATEGIES["flclustering"]
DEFENCE = DefenceSettings(byzantine_fraction=0.0)


def fresh() -> AggregatorState:
    return AggregatorState(state_of(build_model("cnn", (1, 8, 8), 10, seed=0)))


def add(state: AggregatorState, who: str, delta: torch.Tensor, round_: int = 0) -> None:
    state.begin_update(who, round_, state.version)
    state.end_update(PendingUpdate(who, 0, 10, delta), round_)


def test_round_moves_the_model_and_refuses_duplicates_and_wrong_rounds():
    s = fresh()
    d = s.versions[0].numel()
    add(s, "a", torch.full((d,), 0.1))
    with pytest.raises(StateError, match="already submitted"):
        s.begin_update("a", 0, 0)
    with pytest.raises(StateError, match="not open"):
        s.begin_update("b", 1, 0)
    add(s, "b", torch.full((d,), 0.3))
    report = s.aggregate(RoundClose(0, FEDAVG, {}, DEFENCE, 0.05))
    assert report.version == 1 and report.updates == 2
    assert torch.allclose(s.versions[1] - s.versions[0], torch.full((d,), 0.2))
    with pytest.raises(StateError, match="not open"):
        s.aggregate(RoundClose(2, FEDAVG, {}, DEFENCE, 0.05))


def test_aggregate_again_returns_the_same_report_and_changes_nothing(tmp_path):
    """The clusterer may die after asking (or lose the answer): asking again for the round
    just closed answers the same, also from a restarted aggregator."""
    s = fresh()
    d = s.versions[0].numel()
    add(s, "a", torch.full((d,), 0.1))
    add(s, "b", torch.full((d,), 0.3))
    report = s.aggregate(RoundClose(0, FLCLUSTERING, {}, DEFENCE, 0.05))
    weights = s.versions[s.version].clone()
    assert s.aggregate(RoundClose(0, FLCLUSTERING, {}, DEFENCE, 0.05, abandon=True)) == replace(
        report, replayed=True
    )
    assert (s.version, s.open_round) == (1, 1) and torch.equal(s.versions[1], weights)
    s.save(tmp_path)
    again = fresh()
    assert again.restore(tmp_path)
    assert again.aggregate(RoundClose(0, FLCLUSTERING, {}, DEFENCE, 0.05)) == replace(
        report, replayed=True
    )
    assert (again.version, again.open_round) == (1, 1)


def test_a_crash_before_save_recomputes_the_same_bits(tmp_path):
    """kill -9 between the in-memory aggregation and save(): the restarted aggregator still
    has the old counters and the updates (read back in file-name order), and the
    clusterer's repeated Aggregate computes bit for bit what the lost one had."""
    gen = torch.Generator().manual_seed(3)
    first = fresh()
    d = first.versions[0].numel()
    updates = [
        PendingUpdate(f"p{i}", i % 2, 10 + i, torch.randn(d, generator=gen) * 0.01, {})
        for i in range(5)
    ]
    for u in reversed(updates):  # arrival order differs from id and file-name order
        first.begin_update(u.participant, 0, 0)
        first.persist(u, 0, tmp_path)
        first.end_update(u, 0)
    lost = first.aggregate(RoundClose(0, FLCLUSTERING, {0: 0.4, 1: 0.8}, DEFENCE, 0.05))
    lost_weights = first.versions[first.version]
    restarted = fresh()  # save() never ran
    assert restarted.restore(tmp_path) is True
    assert (restarted.version, restarted.open_round, len(restarted.pending)) == (0, 0, 5)
    report = restarted.aggregate(RoundClose(0, FLCLUSTERING, {0: 0.4, 1: 0.8}, DEFENCE, 0.05))
    assert report == lost
    assert torch.equal(restarted.versions[restarted.version], lost_weights)


def test_abandoned_round_keeps_the_model():
    s = fresh()
    add(s, "a", torch.ones(s.versions[0].numel()))
    report = s.aggregate(RoundClose(0, FEDAVG, {}, DEFENCE, 0.05, abandon=True))
    assert report.version == 0 and s.open_round == 1 and not s.pending


def test_state_survives_a_restart(tmp_path):
    s = fresh()
    add(s, "a", torch.full((s.versions[0].numel(),), 0.5))
    s.aggregate(RoundClose(0, FEDAVG, {}, DEFENCE, 0.05))
    s.save(tmp_path)
    assert not list(tmp_path.glob("*.pkl")) and (tmp_path / "model-v1.safetensors").exists()
    again = fresh()
    assert again.restore(tmp_path)
    assert again.version == 1 and again.open_round == 1
    assert torch.equal(again.versions[1], s.versions[1])
    assert not fresh().restore(tmp_path / "empty")


def test_initial_model_is_always_kept():
    s = AggregatorState(state_of(build_model("cnn", (1, 8, 8), 10, seed=0)), keep_versions=2)
    d = s.versions[0].numel()
    for r in range(5):
        add(s, "a", torch.full((d,), 0.1), round_=r)
        s.aggregate(RoundClose(r, FEDAVG, {}, DEFENCE, 0.05))
    assert list(s.versions) == [0, 4, 5]
    assert s.weights(0)[0] == 0


def test_accepted_updates_survive_a_crash_of_the_open_round(tmp_path):
    """Persisted before acknowledged: a new process restores the open round's updates (as
    after kill -9) and aggregates exactly them; a closed round's files go."""
    s = fresh()
    d = s.versions[0].numel()
    for who, value in (("a", 0.1), ("b", 0.3)):
        update = PendingUpdate(who, 1, 10, torch.full((d,), value), {"loss_before": 0.5})
        s.begin_update(who, 0, 0)
        s.persist(update, 0, tmp_path)
        s.end_update(update, 0)
    crashed = fresh()  # nothing else of `s` survives
    assert crashed.restore(tmp_path)
    assert sorted(crashed.pending) == ["a", "b"]
    assert crashed.pending["a"].cluster == 1 and crashed.pending["a"].metrics["loss_before"] == 0.5
    assert torch.equal(crashed.pending["b"].delta, torch.full((d,), 0.3))
    report = crashed.aggregate(RoundClose(0, FEDAVG, {}, DEFENCE, 0.05))
    assert report.updates == 2
    crashed.save(tmp_path)
    assert not list((tmp_path / "pending").glob("*.safetensors"))
    again = fresh()
    assert again.restore(tmp_path) and again.open_round == 1 and not again.pending
    assert torch.allclose(again.versions[again.version], crashed.versions[crashed.version])


def test_a_foreign_update_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "pending").mkdir()
    meta = {"participant": "x", "cluster": "0", "samples": "1", "round": "0", "metrics": "{}"}
    save_file({"delta": torch.zeros(7)}, str(tmp_path / "pending" / "r0-x.safetensors"), meta)
    with pytest.raises(SpecMismatchError):
        fresh().restore(tmp_path)


def test_a_round_aggregated_on_a_device_gives_the_cpu_result_and_reuses_buffers(device):
    """--device: the round is copied to the device for the defence and merge, the new
    model comes back to the CPU, equal to the CPU's; the round's delta buffers are handed
    out again to the next round's uploads (received into without fresh page faults)."""
    model = state_of(build_model("cnn", (1, 8, 8), 10, seed=0))
    on_cpu, on_device = AggregatorState(model), AggregatorState(model, device=device)
    d = on_cpu.versions[0].numel()
    gen = torch.Generator().manual_seed(3)
    deltas = {who: 0.01 * torch.randn(d, generator=gen) for who in "abcdefg"}
    deltas["g"] = deltas["g"] * 100  # the norm screen's
    received = []  # the buffers on_cpu's updates arrived in
    for s in (on_cpu, on_device):
        for who, delta in deltas.items():
            add(s, who, delta.clone())
            if s is on_cpu:
                received.append(s.pending[who].delta.data_ptr())
        report = s.aggregate(
            RoundClose(0, FLCLUSTERING, {}, DefenceSettings(byzantine_fraction=0.2), 0.05)
        )
        assert report.rejected == {"g": "norm"}
    assert on_device.versions[1].device.type == "cpu"
    torch.testing.assert_close(on_device.versions[1], on_cpu.versions[1], rtol=1e-5, atol=1e-6)
    again = [on_cpu.buffer(d) for _ in deltas]  # kept alive: their memory stays theirs
    assert {b.data_ptr() for b in again} == set(received)  # each of the round's, once
    assert on_cpu.buffer(d).data_ptr() not in received  # then new ones


def test_personalised_state_keeps_each_clusters_model_across_a_restart(tmp_path):
    """--personalise: an update is a delta against its cluster's model; each cluster's
    model moves by its own delta, the global is their merge; a restart keeps them all."""
    s = AggregatorState(state_of(build_model("cnn", (1, 8, 8), 10, seed=0)), personalise=True)
    w0 = s.versions[0].clone()
    d = w0.numel()

    def send(who: str, cluster: int, value: float, round_: int) -> None:
        s.begin_update(who, round_, s.version, cluster)
        s.end_update(PendingUpdate(who, cluster, 10, torch.full((d,), value)), round_)

    send("a", 0, 0.1, 0)
    send("b", 1, 0.3, 0)
    s.aggregate(RoundClose(0, STRATEGIES["flclustering-fedavg"], {}, DEFENCE, 0.05))
    assert torch.allclose(s.cluster_models[0], w0 + 0.1)
    assert torch.allclose(s.cluster_models[1], w0 + 0.3)
    assert torch.allclose(s.versions[1], w0 + 0.2)  # round 0: the mean of the two
    # Round 1 trains from the clusters' models: begin_update hands each its own base.
    assert torch.equal(s.begin_update("a", 1, 1, 0), s.cluster_models[0])
    s.release("a")
    assert torch.equal(s.begin_update("c", 1, 1, 7), s.versions[1])  # no model yet: global
    s.release("c")
    v, named = s.weights(-1, 1)
    assert v == 1 and torch.allclose(
        torch.cat([t.flatten() for t in named.values() if t.dtype.is_floating_point]), w0 + 0.3
    )
    with pytest.raises(NotFoundError, match="newest version"):
        s.weights(0, 1)
    s.save(tmp_path)
    assert (tmp_path / "clusters-v1.safetensors").exists()
    again = AggregatorState(state_of(build_model("cnn", (1, 8, 8), 10, seed=0)), personalise=True)
    assert again.restore(tmp_path)
    assert set(again.cluster_models) == {0, 1}
    for c in (0, 1):
        assert torch.equal(again.cluster_models[c], s.cluster_models[c])
    # An aggregator that keeps no cluster models says so.
    with pytest.raises(StateError, match="--personalise"):
        fresh().weights(-1, 0)


def test_a_foreign_cluster_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    s = AggregatorState(state_of(build_model("cnn", (1, 8, 8), 10, seed=0)), personalise=True)
    s.begin_update("a", 0, 0, 0)
    s.end_update(PendingUpdate("a", 0, 10, torch.full((s.versions[0].numel(),), 0.1)), 0)
    s.aggregate(RoundClose(0, STRATEGIES["flclustering-fedavg"], {}, DEFENCE, 0.05))
    s.save(tmp_path)
    save_file({"cluster-0": torch.zeros(3)}, str(tmp_path / "clusters-v1.safetensors"))
    with pytest.raises(SpecMismatchError, match="not a model of this shape"):
        AggregatorState(
            state_of(build_model("cnn", (1, 8, 8), 10, seed=0)), personalise=True
        ).restore(tmp_path)


def test_a_private_round_keeps_its_bound_and_report_across_a_restart(tmp_path):
    """--dp central: the adaptive bound the round moved to and the round's privacy report
    are saved with the version; asked again after a restart, the same report."""
    from services.core.privacy import CentralNoise

    s = fresh()
    d = s.versions[0].numel()
    for who, size in (("a", 0.1), ("b", 0.3), ("c", 0.2)):
        add(s, who, torch.full((d,), size))
    mechanism = CentralNoise(
        1.0, 1.0, {0: 3.0}, torch.Generator().manual_seed(0), 0.5, 0.2, count_noise=1.0
    )
    report = s.aggregate(RoundClose(0, FEDAVG, {}, DEFENCE, 0.05, privacy=mechanism))
    assert report.privacy is not None and report.noise["clipped"] == 3.0  # all longer than 1
    assert s.dp_clip == report.noise["next_clip"] != 1.0
    # The noise is there: the merge is not the clipped mean (1/3 of each clipped update).
    step = s.versions[1] - s.versions[0]
    assert float((step - step.mean()).std()) == pytest.approx(report.noise["sigma"], rel=0.05)
    s.save(tmp_path)
    again = fresh()
    assert again.restore(tmp_path)
    assert again.dp_clip == s.dp_clip
    assert again.aggregate(RoundClose(0, FEDAVG, {}, DEFENCE, 0.05)) == replace(
        report, replayed=True
    )


def test_a_round_report_keeps_its_shortened_clusters_across_a_restart():
    """state.json keeps the last report (the answer to a round asked again): the clusters the
    check shortened come back with it, and a report written before they were reported
    reads back with none."""
    import json

    report = RoundReport(3, 10, {}, {0: 0.5, 1: 0.5}, {}, {}, {0: 0, 1: 0})
    report = replace(report, shortened_clusters={1: "cluster delta 4.0x the other's"})
    back = RoundReport.from_json(json.loads(json.dumps(report.to_json())))
    assert back == report
    old = report.to_json()
    del old["shortened_clusters"]
    assert RoundReport.from_json(json.loads(json.dumps(old))).shortened_clusters == {}
