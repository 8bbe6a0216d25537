"""Who may call what, as whom: real certificates, real mutual TLS, real servers.

A participant's credential names it; the servers take its id from the verified
certificate. With a participant's credential the aggregator's RPCs are refused, acting as
another participant is refused, and so is reading the operators' status.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from services.aggregator.server import AggregatorService
from services.aggregator.server import build_service as build_aggregator
from services.aggregator.settings import AggregatorConfig
from services.cli import main
from services.clusterer.server import ClustererService
from services.clusterer.server import build_service as build_clusterer
from services.clusterer.settings import ClustererConfig
from services.common.pb.flclustering.v1 import aggregator_pb2 as agg_pb
from services.common.pb.flclustering.v1 import aggregator_pb2_grpc as agg_grpc
from services.common.pb.flclustering.v1 import clusterer_pb2 as pb
from services.common.pb.flclustering.v1 import clusterer_pb2_grpc as pb_grpc
from services.common.pb.flclustering.v1 import tensors_pb2
from services.common.streams import build_stream, read_model
from services.core.model_file import load_model_file
from services.transport.client import call_metadata, channel
from services.transport.credentials import (
    Authority,
    load_tls,
    participant_id,
    write_kit,
    write_tokens,
)

from .conftest import rpc_code

C = grpc.StatusCode
ME, OTHER = participant_id(0), participant_id(1)


@dataclass
class Secured:
    """An aggregator and a clusterer on mutual TLS, and the kit that made their identities."""

    kit: Path
    aggregator: AggregatorService
    clusterer: ClustererService

    @property
    def agg_address(self) -> str:
        return f"127.0.0.1:{self.aggregator.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.clusterer.port}"

    def clusterer_as(self, name: str) -> pb_grpc.ClustererStub:
        return pb_grpc.ClustererStub(channel(self.address, client=load_tls(self.kit, name)))

    def aggregator_as(self, name: str) -> agg_grpc.AggregatorStub:
        return agg_grpc.AggregatorStub(channel(self.agg_address, client=load_tls(self.kit, name)))


@pytest.fixture(scope="module")
def secured(tmp_path_factory) -> Iterator[Secured]:
    """A fedavg federation waiting for a 4th member that never comes: the model never
    changes and polls wait."""
    kit = tmp_path_factory.mktemp("kit")
    write_kit(kit, [participant_id(i) for i in range(3)])
    agg = build_aggregator(
        AggregatorConfig().replace(
            host="127.0.0.1", port=0, tls_dir=str(kit), strategy="fedavg", metrics_port=None
        )
    )
    agg.server.start()
    tokens = write_tokens(kit / "tokens", [participant_id(2)])
    clu = build_clusterer(
        ClustererConfig().replace(
            host="127.0.0.1",
            port=0,
            aggregator=f"127.0.0.1:{agg.port}",
            tls_dir=str(kit),
            strategy="fedavg",
            participants=4,
            select=3,
            rounds=1,
            metrics_port=None,
            participant_tokens=str(tokens),
            tls_port=0,
            tls_cert=str(kit / "clusterer.crt"),
            tls_key=str(kit / "clusterer.key"),
        )
    )
    clu.server.start()
    clu.coordinator.start()
    yield Secured(kit, agg, clu)
    clu.coordinator.shutdown()
    clu.server.stop(0).wait()
    agg.server.stop(0).wait()


def join(stub: pb_grpc.ClustererStub, pid: str, **kw: Any) -> grpc.StatusCode:
    return rpc_code(lambda: stub.Join(pb.JoinRequest(participant_id=pid), timeout=10, **kw))


def weights_stream(weights: Any, sender: str) -> Iterator[pb.SubmitUpdateRequest]:
    h = tensors_pb2.ModelHeader(sender=sender, round=0, model_version=0, kind="weights")
    return build_stream(pb.SubmitUpdateRequest, h, h, weights)


def test_a_participant_credential_cannot_reach_the_aggregator(secured):
    """The aggregator's write RPCs accept only the clusterer's identity; its models the
    clusterer and operators."""
    me = secured.aggregator_as(ME)
    operator = secured.aggregator_as("operator")
    _, weights = read_model(secured.aggregator_as("clusterer").GetModel(agg_pb.GetModelRequest()))
    update = agg_pb.UpdateHeader(
        model=tensors_pb2.ModelHeader(sender=ME, round=0, model_version=0, kind="weights")
    )

    def forward() -> Any:
        """A fresh stream per call: a refused call's request thread may still be reading
        the one it was given (a shared generator then fails as 'already executing')."""
        return build_stream(agg_pb.ForwardUpdateRequest, update, update.model, weights)

    for who in (me, operator):
        assert rpc_code(lambda s=who: s.Aggregate(agg_pb.AggregateRequest(round=0))) == (
            C.PERMISSION_DENIED
        )
    # Models: the clusterer and operators (who export it) read them, participants do not;
    # operators read global models only, never a cluster's.
    assert rpc_code(lambda: list(me.GetModel(agg_pb.GetModelRequest()))) == C.PERMISSION_DENIED
    assert rpc_code(lambda: list(operator.GetModel(agg_pb.GetModelRequest()))) == C.OK
    one_cluster = agg_pb.GetModelRequest(cluster=0)
    assert rpc_code(lambda: list(operator.GetModel(one_cluster))) == C.PERMISSION_DENIED
    assert rpc_code(lambda: operator.ForwardUpdate(forward(), timeout=30)) == C.PERMISSION_DENIED
    assert rpc_code(lambda: me.ForwardUpdate(forward(), timeout=30)) == C.PERMISSION_DENIED
    status = agg_pb.GetAggregatorStatusRequest()
    assert rpc_code(lambda: me.GetAggregatorStatus(status)) == C.PERMISSION_DENIED
    # Operators read the status, with the defence the aggregator was started with.
    shown = operator.GetAggregatorStatus(status, timeout=10)
    assert (shown.policy.strategy, shown.policy.byzantine_fraction) == ("fedavg", 0.2)
    assert shown.policy.twin_factor == 0.03
    assert (shown.model_version, shown.open_round, shown.pending_updates) == (0, 0, 0)


def test_a_participant_acts_only_as_itself(secured):
    me = secured.clusterer_as(ME)
    assert join(me, OTHER) == C.PERMISSION_DENIED
    assert join(me, ME) == C.OK
    assert join(secured.clusterer_as(OTHER), OTHER) == C.OK
    poll = pb.GetTaskRequest(participant_id=OTHER, wait_s=0)
    assert rpc_code(lambda: me.GetTask(poll, timeout=10)) == C.PERMISSION_DENIED
    report = pb.ReportEvaluationRequest(
        participant_id=OTHER, evaluation_id="pre-0", accuracy=0.5, loss=1.0, num_examples=3
    )
    assert rpc_code(lambda: me.ReportEvaluation(report, timeout=10)) == C.PERMISSION_DENIED
    _, weights = read_model(me.DownloadModel(pb.DownloadModelRequest(model_version=0)))
    assert rpc_code(lambda: me.SubmitUpdate(weights_stream(weights, OTHER), timeout=30)) == (
        C.PERMISSION_DENIED
    )
    # The operators' status (members, clusters) is not for participants.
    assert rpc_code(lambda: me.GetStatus(pb.GetStatusRequest(), timeout=10)) == (
        C.PERMISSION_DENIED
    )
    status = secured.clusterer_as("operator").GetStatus(pb.GetStatusRequest(), timeout=10)
    assert status.members_total >= 2


def test_no_certificate_or_a_foreign_one_does_not_connect(secured, tmp_path):
    plain = pb_grpc.ClustererStub(channel(secured.address))
    assert join(plain, ME) == C.UNAVAILABLE  # the handshake needs a client certificate
    foreign = tmp_path / "foreign"
    write_kit(foreign, [ME], authority=Authority.create("someone else's CA"))
    # Trusting the real CA (to reach the server) but presenting another CA's certificate.
    mixed = load_tls(foreign, ME)
    real_ca = (secured.kit / "ca.crt").read_bytes()
    stub = pb_grpc.ClustererStub(
        channel(
            secured.address,
            client=type(mixed)(real_ca, mixed.cert, mixed.key),
        )
    )
    assert join(stub, ME) == C.UNAVAILABLE


def test_edge_tokens_name_their_participant(secured):
    """Per-participant tokens over the server-TLS port: the token's id is the caller's."""
    edge = pb_grpc.ClustererStub(
        channel(f"127.0.0.1:{secured.clusterer.tls_port}", str(secured.kit / "ca.crt"))
    )
    token = (secured.kit / "tokens" / f"{participant_id(2)}.token").read_text().strip()
    meta = call_metadata(token)
    assert join(edge, participant_id(2), metadata=meta) == C.OK
    assert join(edge, ME, metadata=meta) == C.PERMISSION_DENIED
    wrong = call_metadata(token[:-4] + "AAAA")
    assert join(edge, participant_id(2), metadata=wrong) == C.UNAUTHENTICATED
    assert join(edge, participant_id(2)) == C.UNAUTHENTICATED  # no token at all


def test_one_identity_cannot_hold_many_calls(secured):
    """Per identity, at most two long polls at once: a third is RESOURCE_EXHAUSTED, while
    another participant's poll still gets through."""
    me = secured.clusterer_as(ME)
    assert join(me, ME) == C.OK
    poll = pb.GetTaskRequest(participant_id=ME, wait_s=3)
    held = [me.GetTask.future(poll, timeout=10) for _ in range(2)]
    time.sleep(0.5)
    assert rpc_code(lambda: me.GetTask(poll, timeout=10)) == C.RESOURCE_EXHAUSTED
    other = secured.clusterer_as(OTHER)
    assert join(other, OTHER) == C.OK
    quick = pb.GetTaskRequest(participant_id=OTHER, wait_s=0)
    assert other.GetTask(quick, timeout=10).kind == pb.TASK_KIND_WAIT
    for f in held:
        assert f.result().kind == pb.TASK_KIND_WAIT


def test_a_stalled_upload_is_cut(tmp_path):
    """An upload that sends its header and goes silent is cut after --stream-idle-s; the
    same participant can upload again and the server's threads are free."""
    agg = build_aggregator(
        AggregatorConfig().replace(
            host="127.0.0.1", port=0, auth_token="t", metrics_port=None, stream_idle_s=1.0
        )
    )
    agg.server.start()
    try:
        stub = agg_grpc.AggregatorStub(channel(f"127.0.0.1:{agg.port}"))
        meta = call_metadata("t")
        _, weights = read_model(stub.GetModel(agg_pb.GetModelRequest(), metadata=meta))
        update = agg_pb.UpdateHeader(
            model=tensors_pb2.ModelHeader(sender=ME, round=0, model_version=0, kind="weights")
        )
        go_on = threading.Event()
        full = list(build_stream(agg_pb.ForwardUpdateRequest, update, update.model, weights))

        def stalling() -> Iterator[agg_pb.ForwardUpdateRequest]:
            yield full[0]  # a valid header (the tensors' specs), then silence
            go_on.wait(30)

        started = time.monotonic()
        code = rpc_code(lambda: stub.ForwardUpdate(stalling(), metadata=meta, timeout=30))
        took = time.monotonic() - started
        go_on.set()
        assert code != C.OK and 1.0 <= took < 10, (code, took)
        reply = stub.ForwardUpdate(iter(full), metadata=meta, timeout=30)
        assert reply.accepted
    finally:
        agg.server.stop(0).wait()


def test_a_thousand_waiting_polls_do_not_starve_health_or_status(federation_factory):
    """1,000 long polls in flight: health, status and a new join answer within 1 s, and
    every poll is still waiting (none was turned away for want of a thread)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from .conftest import META

    fed = federation_factory(strategy="fedavg", participants=2000, max_participants=2000)
    channels = [channel(fed.address) for _ in range(8)]
    stubs = [pb_grpc.ClustererStub(ch) for ch in channels]
    ids = [participant_id(i) for i in range(1000)]
    joins = [
        stubs[i % 8].Join.future(pb.JoinRequest(participant_id=p), metadata=META, timeout=60)
        for i, p in enumerate(ids)
    ]
    for f in joins:
        f.result()
    polls = [
        stubs[i % 8].GetTask.future(
            pb.GetTaskRequest(participant_id=p, wait_s=20), metadata=META, timeout=60
        )
        for i, p in enumerate(ids)
    ]
    try:
        time.sleep(2.0)  # every poll has reached the server
        health = health_pb2_grpc.HealthStub(channel(fed.address))
        timed: list[tuple[str, Callable[[], Any]]] = [
            ("health", lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=1)),
            ("status", lambda: fed.stub.GetStatus(pb.GetStatusRequest(), metadata=META, timeout=1)),
            (
                "join",
                lambda: fed.stub.Join(
                    pb.JoinRequest(participant_id="late-1"), metadata=META, timeout=1
                ),
            ),
        ]
        for what, call in timed:
            started = time.monotonic()
            call()
            assert time.monotonic() - started < 1.0, what
        # A waiting poll holds no thread: all 1,000 are still waiting, none turned away.
        assert not any(f.done() for f in polls)
    finally:
        for f in polls:
            f.cancel()


def test_a_renewed_certificate_is_served_without_a_restart(tmp_path, monkeypatch):
    """cert-manager renews certificates in place: the next handshake presents the new one."""
    import socket
    import ssl

    from cryptography import x509

    import services.transport.tls as transport_tls

    monkeypatch.setattr(transport_tls, "RELOAD_EVERY_S", 0.0)
    kit = tmp_path / "kit"
    authority = write_kit(kit, [ME])
    agg = build_aggregator(
        AggregatorConfig().replace(host="127.0.0.1", port=0, tls_dir=str(kit), metrics_port=None)
    )
    agg.server.start()

    def served() -> bytes:
        context = ssl.create_default_context(cafile=str(kit / "ca.crt"))
        context.load_cert_chain(kit / "clusterer.crt", kit / "clusterer.key")
        context.set_alpn_protocols(["h2"])
        with (
            socket.create_connection(("127.0.0.1", agg.port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number.to_bytes(20, "big")

    try:
        before = served()
        cert, key = authority.issue("aggregator", "aggregator", ["localhost"], ["127.0.0.1"])
        (kit / "aggregator.key").write_bytes(key)
        (kit / "aggregator.crt").write_bytes(cert)
        after = served()
        assert after != before
        assert after == x509.load_pem_x509_certificate(cert).serial_number.to_bytes(20, "big")
        stub = agg_grpc.AggregatorStub(
            channel(f"127.0.0.1:{agg.port}", client=load_tls(kit, "clusterer"))
        )
        assert (
            stub.GetAggregatorStatus(agg_pb.GetAggregatorStatusRequest(), timeout=10).open_round
            == 0
        )
    finally:
        agg.server.stop(0).wait()


def test_health_watch_and_reflection_are_not_open_doors(secured, tmp_path):
    """Only Health/Check is open; a Watch (a stream holding a thread) needs a credential,
    reflection is for operators, and the plain health port answers Check alone."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    def watch(ch: grpc.Channel) -> grpc.StatusCode:
        stream = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=2)
        return rpc_code(lambda: next(iter(stream)))

    assert watch(channel(secured.address, client=load_tls(secured.kit, ME))) == C.OK
    edge = channel(f"127.0.0.1:{secured.clusterer.tls_port}", str(secured.kit / "ca.crt"))
    assert watch(edge) == C.UNAUTHENTICATED  # TLS without any credential

    def services(name: str) -> grpc.StatusCode:
        ch = channel(secured.address, client=load_tls(secured.kit, name))
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        request = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        return rpc_code(lambda: list(refl.ServerReflectionInfo(request, timeout=10)))

    assert services(ME) == C.PERMISSION_DENIED
    assert services("operator") == C.OK

    agg = build_aggregator(
        AggregatorConfig().replace(host="127.0.0.1", port=0, health_port=0, metrics_port=None)
    )
    agg.server.start()
    agg.health_server.start()  # type: ignore[union-attr]
    try:
        plain = channel(f"127.0.0.1:{agg.health_port}")
        check = health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        assert watch(plain) == C.UNIMPLEMENTED
    finally:
        agg.health_server.stop(0)  # type: ignore[union-attr]
        agg.server.stop(0).wait()


def test_tokens_need_tls_and_a_shared_token_excludes_tls(tmp_path):
    """Per-participant tokens are never accepted in plain text; a shared development token
    beside --tls-dir is refused at start (it would give anyone holding it every identity)."""
    from services.core.errors import ConfigError

    kit = tmp_path / "kit"
    write_kit(kit, [])
    tokens = write_tokens(tmp_path / "tokens", [ME])
    config = ClustererConfig().replace(
        host="127.0.0.1",
        port=0,
        aggregator="127.0.0.1:1",
        participant_tokens=str(tokens),
        metrics_port=None,
    )
    clu = build_clusterer(config)
    clu.server.start()
    try:
        token = (tmp_path / "tokens" / f"{ME}.token").read_text().strip()
        plain = pb_grpc.ClustererStub(channel(f"127.0.0.1:{clu.port}"))
        assert join(plain, ME, metadata=call_metadata(token)) == C.UNAUTHENTICATED
    finally:
        clu.server.stop(0).wait()
    with pytest.raises(ConfigError, match="exclude each other"):
        build_aggregator(
            AggregatorConfig().replace(port=0, tls_dir=str(kit), auth_token="t", metrics_port=None)
        )


def test_a_client_follows_its_renewed_certificate(tmp_path, monkeypatch):
    """A long-lived client (a participant, the clusterer towards the aggregator) picks up
    the certificate written over its old one: here the files now name a participant, and
    the next call is the participant's (refused where only the clusterer may call)."""
    import services.transport.client as transport_client
    from services.transport.client import Renewing
    from services.transport.credentials import TlsFiles

    monkeypatch.setattr(transport_client, "RENEW_CHECK_S", 0.0)
    kit = tmp_path / "kit"
    write_kit(kit, [ME])
    agg = build_aggregator(
        AggregatorConfig().replace(host="127.0.0.1", port=0, tls_dir=str(kit), metrics_port=None)
    )
    agg.server.start()

    def connect(tls: TlsFiles) -> tuple[grpc.Channel, agg_grpc.AggregatorStub]:
        ch = channel(f"127.0.0.1:{agg.port}", client=tls)
        return ch, agg_grpc.AggregatorStub(ch)

    try:
        stub = Renewing(load_tls(kit, "clusterer"), connect)
        assert rpc_code(lambda: list(stub.GetModel(agg_pb.GetModelRequest(), timeout=10))) == C.OK
        for suffix in ("key", "crt"):
            (kit / f"clusterer.{suffix}").write_bytes((kit / f"{ME}.{suffix}").read_bytes())
        assert rpc_code(lambda: list(stub.GetModel(agg_pb.GetModelRequest(), timeout=10))) == (
            C.PERMISSION_DENIED
        )
    finally:
        agg.server.stop(0).wait()


def test_an_operator_exports_the_model_a_participant_cannot(secured, tmp_path, capsys):
    """`flclustering export` writes the aggregator's newest model as a model file, read
    with safetensors alone; a participant's certificate and wrong settings are one line."""
    out = tmp_path / "model"
    base = ["export", "--aggregator", secured.agg_address, "--tls-dir", str(secured.kit)]
    assert main([*base, "--out", str(out)]) == 0
    assert "wrote version 0" in capsys.readouterr().out
    model, card = load_model_file(out)
    _, weights = read_model(secured.aggregator_as("clusterer").GetModel(agg_pb.GetModelRequest()))
    state = model.state_dict()
    assert set(state) == set(weights) and all(torch.equal(state[k], weights[k]) for k in weights)
    assert (card.model, card.dataset, card.input_shape) == ("cnn", "digits", (1, 8, 8))
    assert len(card.classes) == 10 and card.extra["model_version"] == 0
    assert card.extra["strategy"] == "fedavg" and card.std[0] > 0

    refused = [
        (["--identity", ME, "--out", str(tmp_path / "p")], "refused 'participant-00000'"),
        (["--model", "2nn", "--out", str(tmp_path / "m")], "is not --model 2nn"),
    ]
    for flags, needle in refused:
        assert main([*base, *flags]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
    assert not [*(tmp_path / "p").iterdir(), *(tmp_path / "m").iterdir()]  # nothing written
    nowhere = ["export", "--aggregator", "127.0.0.1:1", "--out", str(tmp_path / "n")]
    assert main(nowhere) == 2
    err = capsys.readouterr().err
    assert "cannot reach the aggregator at 127.0.0.1:1" in err and err.count("\n") == 1
    # An --out that cannot be a directory is found before anything is fetched.
    (tmp_path / "file").write_text("x")
    assert main([*base, "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert "cannot write --out" in err and err.count("\n") == 1


def test_a_participant_downloads_only_its_own_clusters_model(secured):
    """A cluster's model (--personalise) is served to that cluster's members only; the
    global model to every participant."""
    me = secured.clusterer_as(ME)
    assert join(me, ME) in (C.OK, C.FAILED_PRECONDITION)  # joined here or by another test
    other = pb.DownloadModelRequest(model_version=0, cluster=0)  # ME is in no cluster yet
    assert rpc_code(lambda: list(me.DownloadModel(other, timeout=10))) == C.PERMISSION_DENIED
    assert rpc_code(lambda: list(me.DownloadModel(pb.DownloadModelRequest(), timeout=10))) == C.OK
