"""Every malformed or unwelcome upload gets its status code and changes nothing."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterator

import grpc
import pytest
import torch

from services.common.pb.flclustering.v1 import aggregator_pb2 as agg_pb
from services.common.pb.flclustering.v1 import clusterer_pb2 as pb
from services.common.pb.flclustering.v1 import tensors_pb2
from services.common.streams import build_stream, read_model
from services.transport.client import channel

from .conftest import META, rpc_code

C = grpc.StatusCode
PID = "participant-00000"


def start_round(federation_factory, **settings):
    """A fedavg federation of 3 raw clients, all selected, round 0 collecting updates: the
    federation, participant 0's TRAIN task and the model it trains from."""
    fed = federation_factory(
        strategy="fedavg", participants=3, select=3, rounds=1, round_timeout_s=600, **settings
    )
    for i in range(3):
        fed.stub.Join(
            pb.JoinRequest(
                participant_id=f"participant-{i:05d}", num_train=50, num_test=20, group=-1
            ),
            metadata=META,
            timeout=10,
        )
    task = fed.stub.GetTask(
        pb.GetTaskRequest(participant_id=PID, wait_s=20), metadata=META, timeout=30
    )
    assert task.kind == pb.TASK_KIND_TRAIN and task.round == 0
    _, weights = read_model(
        fed.stub.DownloadModel(pb.DownloadModelRequest(model_version=0), metadata=META)
    )
    return fed, task, weights


@pytest.fixture
def open_round(federation_factory):
    fed, _, weights = start_round(federation_factory)
    return fed, weights


def header(sender=PID, round_=0, version=0):
    return tensors_pb2.ModelHeader(
        sender=sender, round=round_, model_version=version, num_samples=50, kind="weights"
    )


def messages(weights, h=None, chunk=4096):
    h = h or header()
    return list(build_stream(pb.SubmitUpdateRequest, h, h, weights, chunk_bytes=chunk))


def submit(fed, msgs, metadata=META):
    return rpc_code(lambda: fed.stub.SubmitUpdate(iter(msgs), metadata=metadata, timeout=30))


def unchanged(fed):
    status = fed.agg_stub.GetAggregatorStatus(agg_pb.GetAggregatorStatusRequest(), metadata=META)
    return status.model_version == 0 and status.pending_updates == 0


def mutated(weights, name=None, value=None, tensor=None):
    out = OrderedDict((k, v.clone()) for k, v in weights.items())
    if tensor is not None:
        out[name] = tensor
    elif value is not None:
        out[name].view(-1)[0] = value
    return out


def renamed(weights):
    return OrderedDict(("bogus" if i == 0 else k, v) for i, (k, v) in enumerate(weights.items()))


def test_each_bad_upload_gets_its_code_and_changes_nothing(open_round):
    fed, w = open_round
    first = next(iter(w))
    cases = {
        "wrong tensor name": (messages(renamed(w)), C.INVALID_ARGUMENT),
        "wrong shape": (
            messages(mutated(w, first, tensor=w[first].reshape(-1))),
            C.INVALID_ARGUMENT,
        ),
        "wrong dtype": (messages(mutated(w, first, tensor=w[first].double())), C.INVALID_ARGUMENT),
        "NaN": (messages(mutated(w, first, value=float("nan"))), C.INVALID_ARGUMENT),
        "Inf": (messages(mutated(w, first, value=float("inf"))), C.INVALID_ARGUMENT),
        "truncated stream": (messages(w)[:-2], C.DATA_LOSS),
        "bad checksum": (
            [
                *messages(w)[:-1],
                pb.SubmitUpdateRequest(trailer=tensors_pb2.ModelTrailer(xxh3_128=b"x" * 16)),
            ],
            C.DATA_LOSS,
        ),
        "bytes beyond the header's size": (
            [*messages(w)[:-1], pb.SubmitUpdateRequest(data=b"\x00" * 8), messages(w)[-1]],
            C.RESOURCE_EXHAUSTED,
        ),
        "message over the size cap": (
            [*messages(w)[:1], pb.SubmitUpdateRequest(data=b"\x00" * (5 << 20))],
            C.RESOURCE_EXHAUSTED,
        ),
        "no header first": (messages(w)[1:], C.INVALID_ARGUMENT),
        "unknown participant": (messages(w, header(sender="participant-99999")), C.NOT_FOUND),
        "wrong round": (messages(w, header(round_=5)), C.FAILED_PRECONDITION),
        "stale model version": (messages(w, header(version=7)), C.FAILED_PRECONDITION),
    }
    for name, (msgs, expected) in cases.items():
        assert submit(fed, msgs) == expected, name
        assert unchanged(fed), name
    assert submit(fed, messages(w), metadata=()) == C.UNAUTHENTICATED
    assert unchanged(fed)
    # The service kept running and lost nothing: a good update is accepted...
    assert submit(fed, messages(w)) == C.OK
    status = fed.agg_stub.GetAggregatorStatus(agg_pb.GetAggregatorStatusRequest(), metadata=META)
    assert status.pending_updates == 1 and status.model_version == 0
    # ...and sending it again is a duplicate.
    assert submit(fed, messages(w)) == C.FAILED_PRECONDITION
    status = fed.agg_stub.GetAggregatorStatus(agg_pb.GetAggregatorStatusRequest(), metadata=META)
    assert status.pending_updates == 1


def test_a_stalled_or_abandoned_upload_changes_nothing(federation_factory):
    """The clusterer passes uploads on from its event loop: one that stalls mid-stream is
    cut after --stream-idle-s (CANCELLED), one whose sender gives up mid-stream is
    dropped; either way the aggregator keeps nothing, the participant's reservation is
    released and its next upload counts."""
    fed, _, weights = start_round(federation_factory, stream_idle_s=1.0)
    full = messages(weights)
    assert len(full) > 6
    go_on = threading.Event()

    def stalling() -> Iterator[pb.SubmitUpdateRequest]:
        yield from full[:4]  # the header and some data, then silence
        go_on.wait(30)

    started = time.monotonic()
    code = submit(fed, stalling())
    took = time.monotonic() - started
    go_on.set()
    assert code == C.CANCELLED and 1.0 <= took < 10, (code, took)
    assert unchanged(fed)
    silent = threading.Event()

    def mute() -> Iterator[pb.SubmitUpdateRequest]:
        silent.wait(30)  # not even a header
        yield from full

    assert submit(fed, mute()) == C.CANCELLED
    silent.set()
    registry = fed.clusterer.registry

    def refused() -> dict[str, float | None]:
        return {
            why: registry.get_sample_value("flclustering_updates_rejected_total", {"reason": why})
            for why in ("cancelled", "internal")
        }

    # The handler counts a cut stream after its status has gone out: give it a moment.
    deadline = time.monotonic() + 10
    while refused()["cancelled"] != 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert refused()["cancelled"] == 2 and not refused()["internal"], refused()

    gave_up = threading.Event()

    def abandoned() -> Iterator[pb.SubmitUpdateRequest]:
        yield from full[:4]
        gave_up.wait(30)

    upload = fed.stub.SubmitUpdate.future(abandoned(), metadata=META, timeout=30)
    time.sleep(0.5)
    upload.cancel()
    gave_up.set()
    assert unchanged(fed)
    # At once: the upload waits for the abandoned one's reservation to be released.
    assert submit(fed, full) == C.OK
    status = fed.agg_stub.GetAggregatorStatus(agg_pb.GetAggregatorStatusRequest(), metadata=META)
    assert status.pending_participants == [PID]


def test_bad_reports_and_requests(open_round):
    fed, _ = open_round
    bad_eval = pb.ReportEvaluationRequest(
        participant_id=PID, evaluation_id="x", accuracy=1.5, loss=0.1, num_examples=3
    )
    assert (
        rpc_code(lambda: fed.stub.ReportEvaluation(bad_eval, metadata=META)) == C.INVALID_ARGUMENT
    )
    no_task = pb.ReportEvaluationRequest(
        participant_id=PID, evaluation_id="x", accuracy=0.5, loss=0.1, num_examples=3
    )
    assert (
        rpc_code(lambda: fed.stub.ReportEvaluation(no_task, metadata=META)) == C.FAILED_PRECONDITION
    )
    assert (
        rpc_code(
            lambda: fed.stub.GetTask(pb.GetTaskRequest(participant_id="nobody"), metadata=META)
        )
        == C.NOT_FOUND
    )
    assert (
        rpc_code(lambda: fed.stub.Join(pb.JoinRequest(participant_id=""), metadata=META))
        == C.INVALID_ARGUMENT
    )
    missing = pb.DownloadModelRequest(model_version=42)
    assert rpc_code(lambda: list(fed.stub.DownloadModel(missing, metadata=META))) == C.NOT_FOUND
    # Per-cluster fields (--personalise): ranges, pairs, and a federation without them.
    for fields in (
        {"personal_accuracy": float("nan"), "personal_loss": 0.1},
        {"personal_accuracy": 0.5, "personal_loss": float("inf")},
        {"personal_accuracy": 0.5},  # without its loss
    ):
        report = pb.ReportEvaluationRequest(
            participant_id=PID, evaluation_id="x", accuracy=0.5, loss=0.1, num_examples=3, **fields
        )
        code = rpc_code(lambda r=report: fed.stub.ReportEvaluation(r, metadata=META))
        assert code == C.INVALID_ARGUMENT, fields
    for cluster, code in (
        (-1, C.INVALID_ARGUMENT),
        (1 << 20, C.INVALID_ARGUMENT),
        (0, C.NOT_FOUND),
    ):
        request = pb.DownloadModelRequest(model_version=0, cluster=cluster)
        got = rpc_code(lambda r=request: list(fed.stub.DownloadModel(r, metadata=META)))
        assert got == code, cluster


def test_aggregator_checks_rounds_and_versions(open_round):
    fed, _ = open_round
    wrong = agg_pb.AggregateRequest(round=3)
    assert rpc_code(lambda: fed.agg_stub.Aggregate(wrong, metadata=META)) == C.FAILED_PRECONDITION
    bad_acc = agg_pb.AggregateRequest(round=0, cluster_accuracy={0: 2.0})
    assert rpc_code(lambda: fed.agg_stub.Aggregate(bad_acc, metadata=META)) == C.INVALID_ARGUMENT
    gone = agg_pb.GetModelRequest(model_version=9)
    assert rpc_code(lambda: list(fed.agg_stub.GetModel(gone, metadata=META))) == C.NOT_FOUND
    # A cluster's model from an aggregator without --personalise; a cluster id out of range.
    cluster = agg_pb.GetModelRequest(model_version=-1, cluster=0)
    assert rpc_code(lambda: list(fed.agg_stub.GetModel(cluster, metadata=META))) == (
        C.FAILED_PRECONDITION
    )
    far = agg_pb.GetModelRequest(model_version=-1, cluster=-3)
    assert rpc_code(lambda: list(fed.agg_stub.GetModel(far, metadata=META))) == C.INVALID_ARGUMENT
    assert (
        rpc_code(lambda: fed.agg_stub.GetAggregatorStatus(agg_pb.GetAggregatorStatusRequest()))
        == C.UNAUTHENTICATED
    )
    wrong_then_right = (("authorization", "Bearer nope"), *META)
    status = agg_pb.GetAggregatorStatusRequest()
    assert (
        rpc_code(lambda: fed.agg_stub.GetAggregatorStatus(status, metadata=wrong_then_right))
        == C.UNAUTHENTICATED
    )
    assert rpc_code(lambda: fed.agg_stub.GetAggregatorStatus(status, metadata=META)) == C.OK
    assert unchanged(fed)


def test_health_and_reflection_are_served(open_round):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    fed, _ = open_round
    health = health_pb2_grpc.HealthStub(channel(fed.address))
    reply = health.Check(health_pb2.HealthCheckRequest(service="flclustering.v1.Clusterer"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    refl = reflection_pb2_grpc.ServerReflectionStub(channel(fed.address))

    def services(metadata=()):
        request = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        answers = refl.ServerReflectionInfo(request, metadata=metadata, timeout=10)
        return {s.name for a in answers for s in a.list_services_response.service}

    assert "flclustering.v1.Clusterer" in services(META)
    # Reflection lists what the server offers: only to callers with the token.
    assert rpc_code(lambda: services()) == C.UNAUTHENTICATED


def test_long_strings_are_not_echoed_whole(open_round):
    """A 1 MiB participant id comes back as a short status detail, not as the id itself
    (which gRPC would refuse as oversized metadata) and not as a 1 MiB log line."""
    fed, _ = open_round
    huge = "x" * (1 << 20)
    for call in (
        lambda: fed.stub.GetTask(pb.GetTaskRequest(participant_id=huge), metadata=META),
        lambda: fed.stub.Join(pb.JoinRequest(participant_id=huge), metadata=META),
        lambda: fed.stub.ReportEvaluation(
            pb.ReportEvaluationRequest(participant_id=PID, evaluation_id=huge), metadata=META
        ),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() in (C.NOT_FOUND, C.INVALID_ARGUMENT)
        assert len(err.value.details()) <= 400


def test_unparseable_bodies_are_invalid_argument(open_round, caplog):
    """Bytes that are no protobuf message: INVALID_ARGUMENT and one log line, for a unary
    call and for an upload stream, and the service goes on."""
    fed, w = open_round
    ch = channel(fed.address)
    garbage = b"\xff\xff\xff\xff\xff"
    join = ch.unary_unary("/flclustering.v1.Clusterer/Join")
    upload = ch.stream_unary("/flclustering.v1.Clusterer/SubmitUpdate")
    for call in (
        lambda: join(garbage, metadata=META, timeout=10),
        lambda: upload(iter([garbage]), metadata=META, timeout=10),
        lambda: upload(iter([messages(w)[0].SerializeToString(), garbage]), metadata=META),
    ):
        assert rpc_code(call) == C.INVALID_ARGUMENT
    assert not [r for r in caplog.records if r.exc_info]  # no traceback logged
    assert submit(fed, messages(w)) == C.OK


def test_joins_beyond_the_limit_are_refused(federation_factory):
    fed = federation_factory(strategy="fedavg", participants=2, max_participants=2)

    def join(pid):
        return rpc_code(
            lambda: fed.stub.Join(pb.JoinRequest(participant_id=pid), metadata=META, timeout=10)
        )

    assert join("participant-00000") == join("participant-00001") == C.OK
    assert join("sybil-1") == C.RESOURCE_EXHAUSTED
    assert join("participant-00001") == C.OK  # a member joining again is not a new one
    assert fed.status().participants == 2


def test_a_nan_poll_does_not_spin(open_round):
    fed, _ = open_round
    started = time.monotonic()
    reply = fed.stub.GetTask(
        pb.GetTaskRequest(participant_id="participant-00002", wait_s=float("nan")),
        metadata=META,
        timeout=10,
    )
    assert reply.kind in (pb.TASK_KIND_TRAIN, pb.TASK_KIND_WAIT)
    assert time.monotonic() - started < 2.0


def test_join_checks_the_participant_version(federation_factory):
    """A version that is none is refused as malformed, one older than the federation
    accepts as needing an upgrade; each in a message that says which."""
    fed = federation_factory(strategy="fedavg", participants=3, min_participant_version="0.2.0")

    def join(sent: str) -> grpc.RpcError | None:
        request = pb.JoinRequest(participant_id=PID, num_train=50, participant_version=sent)
        try:
            fed.stub.Join(request, metadata=META, timeout=10)
        except grpc.RpcError as exc:
            return exc
        return None

    for garbage in ("latest", "0.2.0; rm -rf /", "\x00"):
        refused = join(garbage)
        assert refused is not None and refused.code() == C.INVALID_ARGUMENT, garbage
        assert "is not a version" in refused.details()
    for old in ("", "0.1.0", "0.2.0rc1"):  # none sent: a participant of 0.1.0
        refused = join(old)
        assert refused is not None and refused.code() == C.FAILED_PRECONDITION, old
        assert refused.details() == (
            f"participant {old or '0.1.0'} is older than the oldest this federation accepts "
            "(0.2.0): upgrade the participant"
        )
    assert fed.status().participants == 0
    assert join("0.2.0") is None and join("1.0") is None
    assert fed.status().participants == 1


def test_every_scalar_field_has_a_limit(open_round):
    """Hostile values in each field the changed RPCs read: the documented code, and the
    round goes on unchanged."""
    fed, w = open_round

    def join(**fields):
        request = pb.JoinRequest(participant_id="participant-00001", **fields)
        return rpc_code(lambda: fed.stub.Join(request, metadata=META, timeout=10))

    assert join(group=-5) == C.INVALID_ARGUMENT
    assert join(num_train=1 << 62) == C.INVALID_ARGUMENT
    assert join(device="d" * (1 << 20)) == C.OK  # stored cut to 64 characters
    assert join(device="\x00\x1b[2J") == C.INVALID_ARGUMENT
    assert join(participant_version="9" * (1 << 20)) == C.INVALID_ARGUMENT

    def upload(**fields):
        h = header()
        for key, value in fields.items():
            if key == "metrics":
                h.metrics.update(value)
            else:
                setattr(h, key, value)
        return submit(fed, messages(w, h))

    assert upload(metrics={"loss_before": float("nan")}) == C.INVALID_ARGUMENT
    assert upload(metrics={f"m{i}": 1.0 for i in range(100)}) == C.INVALID_ARGUMENT
    assert upload(sender="s" * (1 << 20)) == C.INVALID_ARGUMENT
    assert upload(num_samples=1 << 50) == C.INVALID_ARGUMENT
    nan_eval = pb.ReportEvaluationRequest(
        participant_id=PID, evaluation_id="x", accuracy=float("nan"), loss=0.1, num_examples=3
    )
    assert rpc_code(lambda: fed.stub.ReportEvaluation(nan_eval, metadata=META)) == (
        C.INVALID_ARGUMENT
    )

    def aggregate(**fields):
        request = agg_pb.AggregateRequest(round=0, **fields)
        return rpc_code(lambda: fed.agg_stub.Aggregate(request, metadata=META))

    assert aggregate(cluster_accuracy={c: 0.5 for c in range(5000)}) == C.INVALID_ARGUMENT
    assert aggregate(cluster_accuracy={0: float("nan")}) == C.INVALID_ARGUMENT
    assert aggregate(cluster_accuracy={-1: 0.5}) == C.INVALID_ARGUMENT
    for paging in (
        {"members_limit": 5000},
        {"history_limit": 1001},
        {"members_offset": -1},
        {"history_offset": -(1 << 62)},
    ):
        status = pb.GetStatusRequest(**paging)
        assert rpc_code(lambda s=status: fed.stub.GetStatus(s, metadata=META)) == (
            C.INVALID_ARGUMENT
        )
    far = fed.stub.GetStatus(pb.GetStatusRequest(members_offset=1 << 62), metadata=META)
    assert not far.clusters and far.members_total == 3  # past the end: an empty page
    forward = agg_pb.ForwardUpdateRequest(
        header=agg_pb.UpdateHeader(model=messages(w)[0].header, cluster=-1)
    )
    assert (
        rpc_code(lambda: fed.agg_stub.ForwardUpdate(iter([forward]), metadata=META))
        == C.INVALID_ARGUMENT
    )
    assert unchanged(fed)
    assert submit(fed, messages(w)) == C.OK  # the round still takes the good update


@pytest.mark.parametrize("scheme", ["int8", "topk:0.1"])
def test_bad_compressed_uploads_get_their_codes_and_change_nothing(federation_factory, scheme):
    """A federation with --compression: a lying header, content out of range, the wrong
    scheme, a truncated stream; each its code, nothing kept; then a good upload counts."""
    from services.core.quantise import INDICES, SCALES, VALUES, Compression, encode
    from services.core.tensors import spec_of

    fed, task, w = start_round(federation_factory, compression=scheme)
    assert task.training.compression == scheme
    c = Compression.parse(scheme)
    spec = spec_of(w)
    n = sum(s.numel for s in spec if s.dtype.is_floating_point)
    good = encode(0.01 * torch.randn(n), spec, c, torch.Generator().manual_seed(0))

    def h():
        out = header()
        out.kind = c.kind
        return out

    def changed(**tensors):
        return OrderedDict((k, tensors.get(k, v).clone()) for k, v in good.items())

    cases = {
        "weights where the federation compresses": (messages(w), C.INVALID_ARGUMENT),
        "another scheme": (
            messages(encode(torch.zeros(n), spec, Compression("fp16")), _kind(h(), "delta:fp16")),
            C.INVALID_ARGUMENT,
        ),
        "an unknown kind": (messages(good, _kind(h(), "delta:zip")), C.INVALID_ARGUMENT),
        "truncated": (messages(good, h())[:-2], C.DATA_LOSS),
    }
    if c.scheme == "int8":
        first = next(k for k in good if k != SCALES)
        cases |= {
            "a NaN scale": (
                messages(changed(**{SCALES: torch.full_like(good[SCALES], float("nan"))}), h()),
                C.INVALID_ARGUMENT,
            ),
            "a zero scale": (
                messages(changed(**{SCALES: torch.zeros_like(good[SCALES])}), h()),
                C.INVALID_ARGUMENT,
            ),
            "-128": (
                messages(changed(**{first: torch.full_like(good[first], -128)}), h()),
                C.INVALID_ARGUMENT,
            ),
            "float32 where int8 goes": (
                messages(changed(**{first: good[first].float()}), h()),
                C.INVALID_ARGUMENT,
            ),
        }
    else:
        idx, val = good[INDICES], good[VALUES]
        over = encode(0.01 * torch.randn(n), spec, Compression("topk", 0.5))
        cases |= {
            "more values than its share": (messages(over, h()), C.INVALID_ARGUMENT),
            "an index out of range": (
                messages(changed(**{INDICES: torch.cat([idx[:-1], idx.new_tensor([n])])}), h()),
                C.INVALID_ARGUMENT,
            ),
            "repeated indices": (
                messages(changed(**{INDICES: torch.zeros_like(idx)}), h()),
                C.INVALID_ARGUMENT,
            ),
            "a NaN value": (
                messages(changed(**{VALUES: torch.full_like(val, float("nan"))}), h()),
                C.INVALID_ARGUMENT,
            ),
            "as many indices as values, lied about": (
                messages(OrderedDict([(INDICES, idx), (VALUES, torch.cat([val, val[:1]]))]), h()),
                C.INVALID_ARGUMENT,
            ),
        }
    for name, (msgs, expected) in cases.items():
        assert submit(fed, msgs) == expected, name
        assert unchanged(fed), name
    # A good compressed upload is accepted, and it is the delta it encodes.
    assert submit(fed, messages(good, h())) == C.OK
    status = fed.agg_stub.GetAggregatorStatus(agg_pb.GetAggregatorStatusRequest(), metadata=META)
    assert status.pending_updates == 1


def _kind(h, kind):
    h.kind = kind
    return h


def test_bad_encrypted_uploads_get_their_codes_and_change_nothing(federation_factory, tmp_path):
    """--secure he: uploads in the clear, of another key, with ciphertexts that are not
    this federation's (random, another scale, swapped, oversized, missing) or cut short:
    each its code, nothing kept; then a good encrypted upload counts."""
    import tenseal as ts

    from services.common.homomorphic import KEY, KIND, upload_tensors, write_keys
    from services.core.ckks import MAX_CIPHERTEXT_BYTES, PUBLIC_FILE, SECRET_FILE, HeKeys
    from services.core.tensors import flatten, spec_of

    write_keys(tmp_path)
    fed, task, w = start_round(
        federation_factory, secure="he", aggregator_only={"he_key": str(tmp_path / PUBLIC_FILE)}
    )
    assert task.training.secure == "he"
    secret = HeKeys.load(tmp_path / SECRET_FILE, secret=True)
    flat = flatten(w, spec_of(w))
    good = upload_tensors(secret, secret.encrypt(flat, 50))
    other = HeKeys.create()

    def h():
        return _kind(header(), KIND)

    def changed(name, data):
        out = OrderedDict((k, v.clone()) for k, v in good.items())
        out[name] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return out

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=4096, coeff_mod_bit_sizes=[60, 49])
    ctx.global_scale = 2.0**20
    rescaled = bytes(ts.ckks_vector(ctx, flat[:2048].tolist()).serialize())
    swapped = OrderedDict(good)
    last = f"he:{len(good) - 2}"  # holds fewer values than a full one: the swap shows
    swapped["he:0"], swapped[last] = good[last], good["he:0"]
    cases = {
        "weights in the clear": (messages(w), C.INVALID_ARGUMENT),
        "a compressed delta": (
            messages(w, _kind(header(), "delta:fp16")),
            C.INVALID_ARGUMENT,
        ),
        "encrypted under another key": (
            messages(upload_tensors(other, other.encrypt(flat, 50)), h()),
            C.FAILED_PRECONDITION,
        ),
        "another key's tag": (
            messages(changed(KEY, other.fingerprint), h()),
            C.FAILED_PRECONDITION,
        ),
        "random bytes": (messages(changed("he:0", bytes(65_000)), h()), C.INVALID_ARGUMENT),
        "another scale": (messages(changed("he:0", rescaled), h()), C.INVALID_ARGUMENT),
        "swapped ciphertexts": (messages(swapped, h()), C.INVALID_ARGUMENT),
        "a ciphertext too long": (
            messages(changed("he:0", bytes(MAX_CIPHERTEXT_BYTES + 1)), h()),
            C.INVALID_ARGUMENT,
        ),
        "a ciphertext missing": (
            messages(OrderedDict(list(good.items())[:-1]), h()),
            C.INVALID_ARGUMENT,
        ),
        "truncated": (messages(good, h())[:-2], C.DATA_LOSS),
    }
    for name, (msgs, expected) in cases.items():
        assert submit(fed, msgs) == expected, name
        assert unchanged(fed), name
    assert submit(fed, messages(good, h())) == C.OK
    status = fed.agg_stub.GetAggregatorStatus(agg_pb.GetAggregatorStatusRequest(), metadata=META)
    assert status.pending_updates == 1 and status.policy.secure == "he"
