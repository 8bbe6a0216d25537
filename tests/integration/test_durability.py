"""What the aggregator acknowledged survives kill -9: a real process, a real SIGKILL; and the
clusterer's write-ahead log (snapshot + journal) brings its state back, a torn last record
ignored. The whole federation under kill -9: test_kill_services.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from services.clusterer.state import ClustererState, TaskKind
from services.clusterer.store import ClustererStore
from services.common.pb.flclustering.v1 import aggregator_pb2 as agg_pb
from services.common.pb.flclustering.v1 import aggregator_pb2_grpc as agg_grpc
from services.common.pb.flclustering.v1 import tensors_pb2
from services.common.streams import build_stream, read_model
from services.core.errors import ConfigError
from services.core.record import RoundRecord
from services.core.strategies import get_strategy
from services.transport.client import call_metadata, channel

TOKEN = "durability-token"
META = call_metadata(TOKEN)


def start_aggregator(
    state: Path, ready: Path, **settings: str
) -> tuple[subprocess.Popen[bytes], str]:
    ready.unlink(missing_ok=True)
    env = {**os.environ, "FLCLUSTERING_AUTH_TOKEN": TOKEN}
    env.update({f"FLCLUSTERING_{k.upper()}": v for k, v in settings.items()})
    flags = ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--ready-file"]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.aggregator",
            *flags,
            str(ready),
            "--state-dir",
            str(state),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "aggregator did not start"
        time.sleep(0.1)
    return proc, json.loads(ready.read_text())["grpc"]


def status(stub: agg_grpc.AggregatorStub) -> agg_pb.GetAggregatorStatusResponse:
    return stub.GetAggregatorStatus(agg_pb.GetAggregatorStatusRequest(), metadata=META, timeout=10)


def test_an_acknowledged_update_survives_kill_9(tmp_path):
    """Acknowledged, then killed: restored and aggregated; killed again after answering:
    Aggregate asked again answers the same."""
    proc, address = start_aggregator(tmp_path / "state", tmp_path / "ready.json")
    try:
        stub = agg_grpc.AggregatorStub(channel(address))
        _, weights = read_model(stub.GetModel(agg_pb.GetModelRequest(), metadata=META))
        model = tensors_pb2.ModelHeader(
            sender="participant-00001", round=0, model_version=0, num_samples=5, kind="weights"
        )
        update = agg_pb.UpdateHeader(model=model, cluster=0)
        stream = build_stream(agg_pb.ForwardUpdateRequest, update, update.model, weights)
        assert stub.ForwardUpdate(stream, metadata=META, timeout=60).accepted
        assert status(stub).pending_updates == 1
    finally:
        proc.kill()  # SIGKILL right after the acknowledgement
        proc.wait()
    proc, address = start_aggregator(tmp_path / "state", tmp_path / "ready.json")
    try:
        stub = agg_grpc.AggregatorStub(channel(address))
        after = status(stub)
        assert (after.pending_updates, after.open_round, after.model_version) == (1, 0, 0)
        reply = stub.Aggregate(agg_pb.AggregateRequest(round=0), metadata=META)
        assert reply.updates == 1
    finally:
        proc.kill()  # SIGKILL right after answering Aggregate (the answer may be lost)
        proc.wait()
    proc, address = start_aggregator(tmp_path / "state", tmp_path / "ready.json")
    try:
        # The clusterer asks again: the same answer, nothing aggregated twice.
        stub = agg_grpc.AggregatorStub(channel(address))
        again = stub.Aggregate(agg_pb.AggregateRequest(round=0), metadata=META)
        assert again == reply
        after = status(stub)
        assert (after.pending_updates, after.open_round) == (0, 1)
    finally:
        proc.terminate()
        proc.wait(30)


def test_cluster_models_survive_kill_9(tmp_path):
    """--personalise: the cluster models a round made are what the aggregator serves after
    a SIGKILL and a restart, byte for byte, beside the global model."""
    state, ready = tmp_path / "state", tmp_path / "ready.json"
    proc, address = start_aggregator(state, ready, personalise="true")
    served: dict[int | None, dict[str, torch.Tensor]] = {}
    try:
        stub = agg_grpc.AggregatorStub(channel(address))
        _, w0 = read_model(stub.GetModel(agg_pb.GetModelRequest(), metadata=META))
        gen = torch.Generator().manual_seed(0)
        for i, cluster in enumerate((0, 0, 1, 1)):
            shift = 0.01 * (cluster + 1)
            weights = {
                k: v + shift + 0.001 * torch.randn(v.shape, generator=gen)
                if v.is_floating_point()
                else v
                for k, v in w0.items()
            }
            model = tensors_pb2.ModelHeader(
                sender=f"participant-{i:05d}",
                round=0,
                model_version=0,
                num_samples=5,
                kind="weights",
            )
            update = agg_pb.UpdateHeader(model=model, cluster=cluster)
            stream = build_stream(agg_pb.ForwardUpdateRequest, update, update.model, weights)
            assert stub.ForwardUpdate(stream, metadata=META, timeout=60).accepted
        accuracy = {0: 0.5, 1: 0.7}
        reply = stub.Aggregate(
            agg_pb.AggregateRequest(round=0, cluster_accuracy=accuracy), metadata=META
        )
        assert reply.model_version == 1
        for cluster in (None, 0, 1):
            request = agg_pb.GetModelRequest(model_version=1, cluster=cluster)
            served[cluster] = read_model(stub.GetModel(request, metadata=META))[1]
        key = next(k for k, v in w0.items() if v.is_floating_point())
        assert not torch.equal(served[0][key], served[1][key])  # two models, not one
    finally:
        proc.kill()
        proc.wait()
    proc, address = start_aggregator(state, ready, personalise="true")
    try:
        stub = agg_grpc.AggregatorStub(channel(address))
        assert status(stub).model_version == 1
        for cluster, before in served.items():
            request = agg_pb.GetModelRequest(model_version=1, cluster=cluster)
            after = read_model(stub.GetModel(request, metadata=META))[1]
            assert set(after) == set(before)
            assert all(torch.equal(after[k], before[k]) for k in before), cluster
    finally:
        proc.terminate()
        proc.wait(30)


# ---- the clusterer's write-ahead log (services/clusterer/store.py) ----------------------


def clusterer_state(directory: Path, seed: int = 0) -> tuple[ClustererState, np.random.Generator]:
    """A clusterer state persisting to directory (restored from it if it holds one)."""
    state = ClustererState(get_strategy("flclustering"), seed)
    rng = np.random.default_rng(seed)
    state.attach(ClustererStore(directory), rng)
    return state, rng


def test_a_clusterer_restarted_from_its_journal_and_snapshot_goes_on_alike(tmp_path):
    """Members, deltas, clusters, the round's plan, its received updates, evaluations and
    the plan stream come back after a crash (nothing closed, nothing flushed by hand)."""
    state, rng = clusterer_state(tmp_path)
    for i in range(4):
        state.join(f"p{i}", 10, 5, i % 2, "cpu")
    state.start_pretraining()
    for i in range(4):
        state.accept_pretrain_delta(f"p{i}", torch.full((8,), float(i % 2)))
    state.start_clustering()
    ids, deltas = state.pretrained()
    state.set_clusters(ids, np.array([0, 1, 0, 1]), torch.stack(deltas))
    rng.random(3)  # the stream moves on with the plan
    state.plan(0, {"p0": 0, "p1": 1, "p2": 0}, [])
    state.open_round(0, {})
    state.begin_upload("p1", 0, 0)
    state.finish_upload("p1", 0, True)  # journaled, no snapshot since
    state.join("p4", 10, 5, 0, "cpu")  # a late joiner: journaled too
    expected = rng.random(5)

    again, rng2 = clusterer_state(tmp_path)  # as after kill -9: the old one is just dropped
    assert sorted(again.members) == ["p0", "p1", "p2", "p3", "p4"]
    assert {p: again.members[p].cluster for p in ids} == {"p0": 0, "p1": 1, "p2": 0, "p3": 1}
    assert again.progress is not None and again.progress.step == "training"
    assert again.progress.selected == {"p0": 0, "p1": 1, "p2": 0}
    assert again.collecting is not None and again.collecting.received == {"p1"}
    assert torch.equal(again.centroids[1], torch.ones(8))
    # The centroids live in one safetensors file written at clustering, not in each snapshot.
    snapshot = json.loads((tmp_path / "state.json").read_text())
    assert "centroids" not in snapshot and snapshot["centroids_file"].startswith("centroids-")
    assert [p.name for p in tmp_path.glob("centroids-*")] == [snapshot["centroids_file"]]
    assert again.tasks["p4"].kind == TaskKind.PRETRAIN  # not yet grouped: asked again
    assert np.array_equal(rng2.random(5), expected)  # later rounds draw as they would have
    assert again.next_round() == 0


def test_a_torn_last_journal_line_is_ignored(tmp_path):
    """A crash in the middle of an append leaves half a record: the restart drops it and
    keeps everything before it."""
    state, _ = clusterer_state(tmp_path)
    state.join("p0", 10, 5, 0, "cpu")
    state.join("p1", 10, 5, 1, "cpu")
    journal = tmp_path / "journal.jsonl"
    with journal.open("a") as fh:
        fh.write('{"e": "join", "pid": "p2", "member": {"participant_id": "p2", "num_tr')
    again, _ = clusterer_state(tmp_path)
    assert sorted(again.members) == ["p0", "p1"]
    assert journal.read_text() == ""  # folded into a fresh snapshot: no torn line stays
    again.join("p3", 10, 5, 0, "cpu")
    assert sorted(clusterer_state(tmp_path)[0].members) == ["p0", "p1", "p3"]


def test_a_record_already_in_the_snapshot_is_not_replayed(tmp_path):
    """A crash between writing a snapshot and emptying the journal: the records the
    snapshot includes (by sequence number) are skipped."""
    state, _ = clusterer_state(tmp_path)
    state.join("p0", 10, 5, 0, "cpu")
    stale = (tmp_path / "journal.jsonl").read_text()
    state.start_pretraining()  # a snapshot: the journal is emptied
    (tmp_path / "journal.jsonl").write_text(stale)  # as if the truncation never happened
    store = ClustererStore(tmp_path)
    found = store.load()
    assert found is not None and found.snapshot is not None and found.events == []


def test_a_bad_journal_line_in_the_middle_loses_nothing_after_it(tmp_path):
    """A line a failed write left behind: the records after it carry their own sequence
    numbers and are restored."""
    state, _ = clusterer_state(tmp_path)
    state.join("p0", 10, 5, 0, "cpu")
    journal = tmp_path / "journal.jsonl"
    with journal.open("a") as fh:
        fh.write('{"e": "join", "pid": "half\n')
    state.store.close()  # type: ignore[union-attr]
    state.store = ClustererStore(tmp_path)  # a fresh handle appends after the bad line
    state.store.load()
    state.join("p1", 10, 5, 1, "cpu")
    again, _ = clusterer_state(tmp_path)
    assert sorted(again.members) == ["p0", "p1"]


def test_state_of_another_experiment_is_refused(tmp_path):
    """A restart with another seed or strategy must not mix two experiments."""
    state = ClustererState(get_strategy("flclustering"), 0)
    state.attach(ClustererStore(tmp_path), np.random.default_rng(0), {"seed": 0})
    state.join("p0", 10, 5, 0, "cpu")
    state.start_pretraining()
    other = ClustererState(get_strategy("flclustering"), 1)
    with pytest.raises(ConfigError, match="seed: 0 -> 1"):
        other.attach(ClustererStore(tmp_path), np.random.default_rng(1), {"seed": 1})
    same = ClustererState(get_strategy("flclustering"), 0)
    assert same.attach(ClustererStore(tmp_path), np.random.default_rng(0), {"seed": 0})
    assert sorted(same.members) == ["p0"]


def test_finished_rounds_are_appended_once_and_a_line_no_snapshot_counts_is_dropped(tmp_path):
    """The history lives in rounds.jsonl, one line per round, and the snapshot counts it:
    a restart keeps every counted round, drops one appended by a process that died before
    its snapshot, and a snapshot from before rounds.jsonl (history inline) still loads."""
    state, _ = clusterer_state(tmp_path)
    for r in range(3):
        state.record_round(RoundRecord(r, cluster_weights={0: 0.5, 1: 0.5}))
    snapshot = json.loads((tmp_path / "state.json").read_text())
    assert snapshot["rounds"] == 3 and "history" not in snapshot
    lines = (tmp_path / "rounds.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [0, 1, 2]
    state.store.append_round({"round": 3})  # type: ignore[union-attr]  # died before the snapshot
    again, _ = clusterer_state(tmp_path)
    assert [h.round for h in again.history] == [0, 1, 2]
    assert again.history[0].cluster_weights == {0: 0.5, 1: 0.5}  # ids are ints again
    assert again.next_round() == 3
    assert len((tmp_path / "rounds.jsonl").read_text().splitlines()) == 3
    # The first format kept the history in the snapshot: it moves to rounds.jsonl.
    snapshot = json.loads((tmp_path / "state.json").read_text())
    snapshot["history"] = [{"round": 0}, {"round": 1}]
    del snapshot["rounds"]
    (tmp_path / "state.json").write_text(json.dumps(snapshot))
    (tmp_path / "rounds.jsonl").unlink()
    old, _ = clusterer_state(tmp_path)
    assert [h.round for h in old.history] == [0, 1]
    assert len((tmp_path / "rounds.jsonl").read_text().splitlines()) == 2
    # A damaged directory (rounds missing that the snapshot counts) is refused, not guessed.
    (tmp_path / "rounds.jsonl").write_text("")
    with pytest.raises(ConfigError, match="damaged"):
        clusterer_state(tmp_path)


def test_history_json_follows_the_rounds_while_cheap_and_is_whole_at_the_end(tmp_path):
    """history.json is rewritten whole, so after a round only when that costs under 2% of
    the time since the last rewrite (here each costs 10 ms of the clock: 0.5 s apart);
    rounds.jsonl has every round at once, and finishing writes the export whatever it costs."""
    now = [0.0]

    def clock() -> float:  # every reading advances it by 10 ms: an export costs 10 ms
        now[0] += 0.01
        return now[0]

    state = ClustererState(get_strategy("flclustering"), 0)
    state.attach(ClustererStore(tmp_path, clock=clock), np.random.default_rng(0))

    def exported() -> list[int]:
        return [h["round"] for h in json.loads((tmp_path / "history.json").read_text())["history"]]

    def recorded() -> list[int]:
        return [json.loads(x)["round"] for x in (tmp_path / "rounds.jsonl").read_text().split()]

    state.record_round(RoundRecord(0))
    assert exported() == [0]  # the first export is always due
    now[0] += 1.0
    state.record_round(RoundRecord(1))
    assert exported() == [0, 1]  # 1 s after a 10 ms export
    for r in (2, 3):
        state.record_round(RoundRecord(r))
    assert exported() == [0, 1]  # 10-20 ms after it: would cost half the time
    assert recorded() == [0, 1, 2, 3]  # the record is not throttled
    now[0] += 1.0
    state.record_round(RoundRecord(4))
    assert exported() == [0, 1, 2, 3, 4]
    state.record_round(RoundRecord(5))
    assert exported() == [0, 1, 2, 3, 4]
    state.finish(6)
    assert exported() == [0, 1, 2, 3, 4, 5]
    assert json.loads((tmp_path / "history.json").read_text())["phase"] == "done"
    assert not list(tmp_path.glob("*.tmp"))


def test_a_snapshot_with_inline_centroids_still_restores(tmp_path):
    """Snapshots written before the centroids had their own file held them as JSON."""
    state, _ = clusterer_state(tmp_path)
    for i in range(2):
        state.join(f"p{i}", 10, 5, i, "cpu")
    state.start_pretraining()
    for i in range(2):
        state.accept_pretrain_delta(f"p{i}", torch.full((4,), float(i)))
    state.start_clustering()
    ids, deltas = state.pretrained()
    state.set_clusters(ids, np.array([0, 1]), torch.stack(deltas))
    path = tmp_path / "state.json"
    snapshot = json.loads(path.read_text())
    (tmp_path / snapshot.pop("centroids_file")).unlink()
    snapshot["centroids"] = {"1": {"dtype": "float32", "values": [1.0, 1.0, 1.0, 1.0]}}
    path.write_text(json.dumps(snapshot))
    again, _ = clusterer_state(tmp_path)
    assert torch.equal(again.centroids[1], torch.ones(4))
    assert json.loads(path.read_text())["centroids_file"]  # moved to its own file


def test_encrypted_updates_and_models_survive_kill_9(tmp_path):
    """--secure he: acknowledged ciphertexts and the encrypted version a round made come
    back after SIGKILL, byte for byte, and decrypt to FedAvg of what was sent."""
    from services.common.homomorphic import KIND, open_model, upload_tensors, write_keys
    from services.core.ckks import PUBLIC_FILE, SECRET_FILE, HeKeys
    from services.core.tensors import flatten, spec_of

    write_keys(tmp_path / "he")
    secret = HeKeys.load(tmp_path / "he" / SECRET_FILE, secret=True)
    settings = {
        "strategy": "fedavg",
        "secure": "he",
        "he_key": str(tmp_path / "he" / PUBLIC_FILE),
    }

    def start() -> tuple[subprocess.Popen[bytes], agg_grpc.AggregatorStub]:
        proc, address = start_aggregator(tmp_path / "state", tmp_path / "ready.json", **settings)
        return proc, agg_grpc.AggregatorStub(channel(address))

    def forward(stub, sender, round_, version, flat, n):
        model = tensors_pb2.ModelHeader(
            sender=sender, round=round_, model_version=version, num_samples=n, kind=KIND
        )
        update = agg_pb.UpdateHeader(model=model, cluster=0)
        tensors = upload_tensors(secret, secret.encrypt(flat, n))
        stream = build_stream(agg_pb.ForwardUpdateRequest, update, update.model, tensors)
        return stub.ForwardUpdate(stream, metadata=META, timeout=60).accepted

    proc, stub = start()
    try:
        header, w0 = read_model(stub.GetModel(agg_pb.GetModelRequest(), metadata=META))
        assert header.kind == "weights"  # version 0, the seeded w0, is public
        spec = spec_of(w0)
        sent = {
            "participant-00001": (flatten(w0, spec) + 0.5, 10),
            "participant-00002": (flatten(w0, spec) - 0.25, 30),
        }
        for sender, (flat, n) in sent.items():
            assert forward(stub, sender, 0, 0, flat, n)
    finally:
        proc.kill()  # SIGKILL right after the acknowledgements
        proc.wait()
    proc, stub = start()
    try:
        assert status(stub).pending_updates == 2
        reply = stub.Aggregate(agg_pb.AggregateRequest(round=0), metadata=META)
        assert (reply.updates, reply.model_version) == (2, 1)
    finally:
        proc.kill()  # SIGKILL right after answering Aggregate
        proc.wait()
    proc, stub = start()
    try:
        assert stub.Aggregate(agg_pb.AggregateRequest(round=0), metadata=META) == reply
        newest = agg_pb.GetModelRequest(model_version=-1)
        header, sealed = read_model(stub.GetModel(newest, metadata=META))
        assert (header.kind, header.model_version) == (KIND, 1)
        got = flatten(open_model(sealed, secret, spec), spec)
        want = (10 * sent["participant-00001"][0] + 30 * sent["participant-00002"][0]) / 40
        assert torch.allclose(got, want, atol=1e-5)
        assert forward(stub, "participant-00001", 1, 1, got, 10)
    finally:
        proc.kill()
        proc.wait()
    proc, stub = start()
    try:
        after = status(stub)
        assert (after.pending_updates, after.open_round, after.model_version) == (1, 1, 1)
        newest = agg_pb.GetModelRequest(model_version=-1)
        _, again = read_model(stub.GetModel(newest, metadata=META))
        assert all(torch.equal(again[k], v) for k, v in sealed.items())
    finally:
        proc.terminate()
        proc.wait(30)
