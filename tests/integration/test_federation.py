"""A federation over real gRPC: it learns, and a dead participant does not hold a round."""

from __future__ import annotations

import time
from typing import Any

import pytest

from services.common.pb.flclustering.v1 import clusterer_pb2 as pb

from .conftest import META


def test_six_participants_learn_over_grpc(federation_factory):
    fed = federation_factory(participants=6, select=6, rounds=3, clusters=3)
    fed.add_participants(0, 3)
    fed.add_participants(3, 3)
    status = fed.wait_for(lambda s: s.done, timeout=240)
    accs = [h.mean_accuracy for h in status.history]
    assert len(accs) == 3
    assert accs[-1] > accs[0] + 0.1, accs
    assert all(h.received == h.selected == 6 for h in status.history)
    assert status.purity >= 0.99  # practical-noniid groups recovered
    assert status.model_version == 3
    assert [h.evaluated for h in status.history] == [6, 6, 6]


@pytest.mark.parametrize("scheme,ratio", [("int8", 4), ("topk:0.01", 50)])
def test_compressed_updates_learn_over_grpc(federation_factory, scheme, ratio):
    """--compression: participants send their deltas compressed (told by the task), the
    aggregator decodes them before the defence; the model learns and the bytes it received
    per update are the model's float32 bytes divided by about `ratio`."""
    fed = federation_factory(participants=6, select=6, rounds=3, clusters=3, compression=scheme)
    fed.add_participants(0, 6)
    status = fed.wait_for(lambda s: s.done, timeout=240)
    accs = [h.mean_accuracy for h in status.history]
    assert all(h.received == h.selected == 6 and h.rejected < 6 for h in status.history)
    assert accs[-1] > accs[0] + 0.05 or accs[-1] > 0.8, accs
    registry = fed.aggregator.registry
    count = registry.get_sample_value("flclustering_update_size_bytes_count")
    total = registry.get_sample_value("flclustering_update_size_bytes_sum")
    floats = sum(s.numel for s in fed.aggregator.servicer.state.spec)
    assert count == 18
    assert 0.8 * 4 * floats / ratio <= total / count <= 1.25 * 4 * floats / ratio


def test_encrypted_fedavg_learns_as_plaintext_fedavg(federation_factory, tmp_path):
    """--secure he over real gRPC: the aggregator holds the public context only (it cannot
    decrypt what it adds, nor the model it serves), participants decrypt the global model,
    and the accuracies are within a point of plaintext FedAvg with the same seed."""
    import tenseal as ts
    import torch

    from services.common.homomorphic import KIND, open_model, write_keys
    from services.common.pb.flclustering.v1 import aggregator_pb2 as agg_pb
    from services.common.streams import read_model
    from services.core.ckks import PUBLIC_FILE, SECRET_FILE, HeKeys
    from services.core.errors import ConfigError
    from services.core.tensors import spec_of

    write_keys(tmp_path)
    runs = {}
    for secure in ("none", "he"):
        extra = {"he_key": str(tmp_path / PUBLIC_FILE)} if secure == "he" else {}
        fed = federation_factory(
            extra, strategy="fedavg", participants=6, select=6, rounds=3, secure=secure
        )
        mine = {"he_key": str(tmp_path / SECRET_FILE)} if secure == "he" else {}
        fed.add_participants(0, 6, strategy="fedavg", secure=secure, **mine)
        status = fed.wait_for(lambda s: s.done, timeout=240)
        assert all(h.received == h.selected == 6 for h in status.history)
        runs[secure] = [h.mean_accuracy for h in status.history]
    assert runs["he"][-1] > 0.6, runs
    for plain, sealed in zip(runs["none"], runs["he"], strict=True):
        assert abs(plain - sealed) <= 0.01, runs
    state = fed.aggregator.servicer.state
    assert not state.keys.private
    header, served = read_model(
        fed.agg_stub.GetModel(agg_pb.GetModelRequest(model_version=-1), metadata=META)
    )
    assert header.kind == KIND and header.model_version == 3
    with pytest.raises(ConfigError, match="no secret key"):
        state.keys.decrypt([bytes(served["he:0"].numpy())], 2048)
    vector = ts.ckks_vector_from(state.keys.context, bytes(served["he:0"].numpy()))
    with pytest.raises(ValueError, match="secret"):
        vector.decrypt()
    # An operator exports the model only with the participants' secret key.
    from services.cli import main
    from services.core.model_file import load_model_file

    from .conftest import TOKEN

    args = ["export", "--aggregator", f"127.0.0.1:{fed.aggregator.port}", "--auth-token", TOKEN]
    assert main([*args, "--out", str(tmp_path / "none")]) == 2
    assert not (tmp_path / "none" / "model.safetensors").exists()
    out = tmp_path / "model"
    assert main([*args, "--out", str(out), "--he-key", str(tmp_path / SECRET_FILE)]) == 0
    model, card = load_model_file(out / "model.safetensors")
    assert card.extra["model_version"] == 3
    # ...and it is the served ciphertexts, decrypted (what participants train from).
    secret = HeKeys.load(tmp_path / SECRET_FILE, secret=True)
    want = open_model(served, secret, spec_of(model.state_dict()))
    got = model.state_dict()
    assert all(torch.allclose(got[k].float(), v.float(), atol=1e-6) for k, v in want.items())


def test_a_participant_set_up_to_encrypt_sends_nothing_in_the_clear(federation_factory, tmp_path):
    """No downgrade: a clusterer that asks for plaintext updates gets none from a
    participant started with --secure he; the round goes on without it."""
    from services.common.homomorphic import write_keys
    from services.core.ckks import SECRET_FILE

    write_keys(tmp_path)
    fed = federation_factory(
        strategy="fedavg",
        participants=2,
        select=2,
        rounds=1,
        round_timeout_s=4.0,
        eval_timeout_s=4.0,
    )
    fed.add_participants(0, 1, strategy="fedavg")
    fed.add_participants(1, 1, strategy="fedavg", secure="he", he_key=str(tmp_path / SECRET_FILE))
    status = fed.wait_for(lambda s: s.done, timeout=120)
    (first,) = status.history
    assert first.selected == 2 and first.received == 1 and first.timed_out == 1


def test_dead_participant_does_not_hold_the_round(federation_factory):
    fed = federation_factory(
        strategy="fedavg",
        participants=6,
        select=6,
        rounds=3,
        round_timeout_s=3.0,
        liveness_s=1.0,
        eval_timeout_s=5.0,
    )
    fed.add_participants(0, 5)
    # The sixth participant joins, receives its training task, and dies.
    fed.stub.Join(
        pb.JoinRequest(participant_id="participant-00005", num_train=10, num_test=10, group=-1),
        metadata=META,
        timeout=10,
    )
    task = fed.stub.GetTask(
        pb.GetTaskRequest(participant_id="participant-00005", wait_s=20), metadata=META, timeout=30
    )
    assert task.kind == pb.TASK_KIND_TRAIN
    started = time.monotonic()
    status = fed.wait_for(lambda s: s.done, timeout=120)
    first = status.history[0]
    assert first.timed_out == 1 and first.received == 5
    assert first.duration_s < 3.0 + 5.0 + 3.0  # deadline + evaluation deadline + slack
    assert all(h.selected == 5 for h in status.history[1:])  # no longer live: not selected
    assert time.monotonic() - started < 60


def test_participants_reconnect_when_the_clusterer_restarts(federation_factory):

    from services.clusterer.server import build_service

    fed = federation_factory(
        strategy="fedavg", participants=3, select=3, rounds=6, round_timeout_s=20
    )
    fed.add_participants(0, 3, participants=3)
    fed.wait_for(lambda s: len(s.history) >= 2, timeout=120)
    # The clusterer dies (mid-round or between rounds) and comes back on the same port.
    old = fed.clusterer
    old.coordinator.shutdown()
    old.server.stop(0).wait()
    config = old.servicer.config.replace(port=old.port)
    fed.clusterer = build_service(config)
    fed.clusterer.server.start()
    fed.clusterer.coordinator.start()
    status = fed.wait_for(lambda s: s.done, timeout=180)
    # The participants re-joined the new clusterer, which went on from the aggregator's round.
    assert status.participants == 3
    assert status.history and status.history[0].round >= 2
    assert status.history[-1].round == 5
    assert status.history[-1].mean_accuracy > 0.2


def _six_participants_and_one_by_hand(
    federation_factory: Any,
) -> tuple[Any, str, pb.GetTaskResponse]:
    """A clustered federation of 7: six in-process participants, and participant-00006,
    joined by hand and holding its PRETRAIN task (the test sends what it likes)."""
    fed = federation_factory(participants=7, select=6, rounds=1, clusters=3)
    fed.add_participants(0, 6, participants=7)
    pid = "participant-00006"
    fed.stub.Join(pb.JoinRequest(participant_id=pid, num_train=10, num_test=10), metadata=META)
    task = fed.stub.GetTask(pb.GetTaskRequest(participant_id=pid, wait_s=30), metadata=META)
    assert task.kind == pb.TASK_KIND_PRETRAIN
    return fed, pid, task


def test_one_absurd_pretraining_delta_cannot_fail_the_federation(federation_factory):
    """A pre-training delta of finite but huge values (3e38, near float32's limit) used to
    overflow the clustering and fail the whole federation; it is now refused alone."""
    from collections import OrderedDict

    from services.common.pb.flclustering.v1 import tensors_pb2
    from services.common.streams import build_stream, read_model

    fed, pid, _ = _six_participants_and_one_by_hand(federation_factory)
    _, w0 = read_model(fed.stub.DownloadModel(pb.DownloadModelRequest(), metadata=META))
    huge = OrderedDict((k, v.clone().fill_(3e38)) for k, v in w0.items())
    header = tensors_pb2.ModelHeader(sender=pid, round=-1, kind="pretrain-delta")
    reply = fed.stub.SubmitUpdate(
        build_stream(pb.SubmitUpdateRequest, header, header, huge), metadata=META, timeout=60
    )
    assert reply.accepted
    status = fed.wait_for(lambda s: s.done, timeout=240)
    clusters = {c.participant_id: c.cluster for c in status.clusters}
    assert clusters[pid] == -1  # refused: never selected, never grouped
    assert all(c >= 0 for p, c in clusters.items() if p != pid)
    assert status.history[0].received == status.history[0].selected == 6


def test_participants_of_a_long_model_send_a_sketch_and_a_malformed_one_is_refused(
    federation_factory,
):
    """A model longer than SKETCH_ABOVE is clustered on CountSketches: the PRETRAIN task
    asks for one (8 KB instead of the delta), the clusterer checks its name and shape."""
    from collections import OrderedDict

    import grpc
    import torch

    from services.common.pb.flclustering.v1 import tensors_pb2
    from services.common.streams import build_stream
    from services.core.sketch import SKETCH_DIM

    fed, pid, task = _six_participants_and_one_by_hand(federation_factory)
    assert task.training.sketch_dim == SKETCH_DIM

    def send(tensors: OrderedDict[str, torch.Tensor]) -> Any:
        header = tensors_pb2.ModelHeader(sender=pid, round=-1, kind="pretrain-sketch")
        stream = build_stream(pb.SubmitUpdateRequest, header, header, tensors)
        return fed.stub.SubmitUpdate(stream, metadata=META, timeout=60)

    for bad in (
        OrderedDict(sketch=torch.zeros(SKETCH_DIM + 1)),
        OrderedDict(other=torch.zeros(SKETCH_DIM)),
        OrderedDict(sketch=torch.zeros(SKETCH_DIM, dtype=torch.float64)),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            send(bad)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert send(OrderedDict(sketch=torch.full((SKETCH_DIM,), 1e-3))).accepted
    # Clustered with the others (whose in-process workers sent sketches of their own).
    status = fed.wait_for(lambda s: all(c.cluster >= 0 for c in s.clusters), timeout=120)
    assert len(status.clusters) == 7
    assert len({c.cluster for c in status.clusters}) == 3


def test_a_w0_file_in_another_order_still_trains(federation_factory, tmp_path):
    """Pretrained weights from another tool list tensors by name (safetensors' own order,
    no recorded model order): the aggregator serves them in that order, and participants
    send their updates in it, so the rounds are aggregated, not refused."""
    from safetensors.torch import save_file

    from services.core.model_file import read_weights
    from services.core.models import build_model
    from services.core.tensors import state_of

    model = build_model("cnn", (1, 8, 8), 10, seed=0)
    path = tmp_path / "pretrained.safetensors"
    save_file(dict(state_of(model)), str(path))  # no metadata: the file's order
    assert list(read_weights(path)) != list(model.state_dict())  # bias before weight
    fed = federation_factory(
        aggregator_only={"initial_model": str(path)},
        participants=6,
        select=6,
        rounds=2,
        clusters=3,
    )
    fed.add_participants(0, 6)
    status = fed.wait_for(lambda s: s.done, timeout=240)
    assert all(h.received == h.selected == 6 for h in status.history)
    assert status.model_version == 2
