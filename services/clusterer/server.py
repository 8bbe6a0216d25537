"""The clusterer's gRPC service: membership, long-polled tasks, uploads forwarded as streams."""

from __future__ import annotations

import itertools
import logging
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import grpc
from grpc_health.v1.health import HealthServicer
from prometheus_client import CollectorRegistry

from services.clusterer.coordinator import ClustererParts, Coordinator, ModelCache
from services.clusterer.metrics import ClustererMetrics
from services.clusterer.settings import ClustererConfig
from services.clusterer.state import ClustererState, Evaluation
from services.common.credentials import TlsFiles, TokenTable
from services.common.errors import NotFoundError, StateError
from services.common.grpc_client import Renewing, call_metadata, channel, quiet_refused_streams
from services.common.grpc_server import (
    Policy,
    StallWatch,
    act_as,
    add_health_and_reflection,
    bind_service,
    bind_tls,
    credentials,
    new_server,
    rpc,
    serve_health,
)
from services.common.metrics import (
    ServerMetricsInterceptor,
    counting_refusals,
    instrument_channel,
    serve_metrics,
)
from services.common.pb.flclustering.v1 import aggregator_pb2 as agg_pb
from services.common.pb.flclustering.v1 import aggregator_pb2_grpc as agg_grpc
from services.common.pb.flclustering.v1 import clusterer_pb2 as pb
from services.common.pb.flclustering.v1 import clusterer_pb2_grpc as pb_grpc
from services.common.strategies import get_strategy
from services.common.streams import Received, encoded_stream, read_all, validated
from services.common.wire import (
    MAX_ID_LENGTH,
    MAX_SAMPLES,
    StreamReader,
    WireError,
    check_header_tensors,
    check_id,
    check_update_header,
    invalid,
)

logger = logging.getLogger(__name__)

SERVICE = "flclustering.v1.Clusterer"


class ClustererServicer(pb_grpc.ClustererServicer, ClustererParts):
    """Unpack, call the state's rules, pack: the coordinator thread runs the rounds."""

    def __init__(self, *parts: Any) -> None:  # ClustererParts' arguments
        ClustererParts.__init__(self, *parts)
        self.polls = threading.BoundedSemaphore(max(1, self.config.service.max_workers // 2))
        tr = self.config.transport
        self.watch = StallWatch(tr.stream_idle_s, tr.stream_max_s)
        t = self.config.training
        self.training = pb.TrainingSettings(
            epochs=t.local_epochs,
            batch_size=t.batch_size,
            lr=t.lr,
            momentum=t.momentum,
            pre_steps=t.pre_steps,
            adjusted=t.adjusted,
            report_loss=get_strategy(self.config.federation.strategy).needs_losses,
        )

    @rpc("Clusterer.Join")
    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinResponse:
        pid = request.participant_id
        check_id(pid, "participant_id")
        act_as(pid)
        if not (0 <= request.num_train <= MAX_SAMPLES and 0 <= request.num_test <= MAX_SAMPLES):
            raise invalid(f"sample counts must be in [0, {MAX_SAMPLES}]")
        if not -1 <= request.group < MAX_GROUPS:
            raise invalid(f"group must be -1 (unknown) or a group index below {MAX_GROUPS}")
        device = request.device[:MAX_ID_LENGTH]
        if not device.isprintable():
            raise invalid("device must be printable text")
        if self.state.join(pid, request.num_train, request.num_test, request.group, device):
            logger.info("[Clusterer.Join] %s joined (%s)", pid, device or "?")
        joined = self.state.joined()
        self.metrics.joined.set(joined)
        return pb.JoinResponse(participant_id=pid, participants=joined)

    @rpc("Clusterer.GetTask")
    def GetTask(
        self, request: pb.GetTaskRequest, context: grpc.ServicerContext
    ) -> pb.GetTaskResponse:
        pid = request.participant_id
        check_id(pid, "participant_id")
        act_as(pid)
        cap = self.config.transport.poll_cap_s
        wait = min(max(request.wait_s, 0.0), cap) if math.isfinite(request.wait_s) else 0.0
        # A long poll holds a server thread: past the poll slots, the answer comes at once
        # with a hint when to ask again, so waiting participants never starve other calls.
        held = self.polls.acquire(blocking=False)
        try:
            task = self.state.next_task(pid, wait if held else 0.0, context.is_active)
        finally:
            if held:
                self.polls.release()
        if task is None:
            kind, round_, version = self.state.idle_answer()
            return pb.GetTaskResponse(
                kind=kind,  # type: ignore[arg-type]
                round=round_,
                model_version=version,
                next_poll_s=0.0 if held or wait == 0 else min(wait, BUSY_POLL_S),
            )
        training = pb.TrainingSettings()
        training.CopyFrom(self.training)
        training.lr = self.config.training.lr_at(task.round)
        return pb.GetTaskResponse(
            kind=task.kind,  # type: ignore[arg-type]
            round=task.round,
            model_version=task.model_version,
            training=training,
            evaluation_id=task.evaluation_id,
        )

    @rpc("Clusterer.SubmitUpdate")
    def SubmitUpdate(
        self, request_iterator: Iterator[pb.SubmitUpdateRequest], context: grpc.ServicerContext
    ) -> pb.SubmitUpdateResponse:
        with counting_refusals(self.metrics.updates_rejected):
            reply = self._submit(
                self.watch.watch(request_iterator, context, "SubmitUpdate"), context.cancel
            )
        if reply.round >= 0:
            self.metrics.updates_received.inc()
        return reply

    def _submit(
        self, request_iterator: Iterator[pb.SubmitUpdateRequest], cut: Callable[[], None]
    ) -> pb.SubmitUpdateResponse:
        it = iter(request_iterator)
        first = next(it, None)
        if first is None or first.WhichOneof("part") != "header":
            raise invalid("a weights stream must start with a header")
        h = first.header
        check_update_header(h)
        act_as(h.sender)
        if h.kind == "pretrain-delta":
            return self._pretrain_delta(h, itertools.chain([first], it))
        if h.kind != "weights":
            raise invalid(f"unknown update kind {h.kind[:32]!r} (weights or pretrain-delta)")
        cluster = self.state.begin_upload(h.sender, h.round, h.model_version, cut)
        accepted = False
        try:
            self._forward(first, it, cluster)
            accepted = True
        finally:
            self.state.finish_upload(h.sender, h.round, accepted)
        return pb.SubmitUpdateResponse(accepted=True, round=h.round)

    def _reader_for(self, header: Any, keep: bool = False) -> StreamReader:
        """Check an upload's header against the model; the reader for its bytes."""
        check_header_tensors(header.tensors, self.models.spec)
        return StreamReader(
            self.models.spec, keep=keep, max_bytes=self.config.transport.max_update_bytes
        )

    def _forward(self, first: pb.SubmitUpdateRequest, rest: Iterator[Any], cluster: int) -> None:
        """Validate the upload chunk by chunk while streaming it on to the aggregator."""
        received = Received()
        failure: list[BaseException] = []

        def requests() -> Iterator[agg_pb.ForwardUpdateRequest]:
            try:
                for msg in validated(itertools.chain([first], rest), self._reader_for, received):
                    part = msg.WhichOneof("part")
                    if part == "header":
                        yield agg_pb.ForwardUpdateRequest(
                            header=agg_pb.UpdateHeader(model=msg.header, cluster=cluster)
                        )
                    elif part == "data":
                        self.metrics.rpc.received_bytes.inc(len(msg.data))
                        self.metrics.rpc.sent_bytes.inc(len(msg.data))
                        yield agg_pb.ForwardUpdateRequest(data=msg.data)
                    else:
                        yield agg_pb.ForwardUpdateRequest(trailer=msg.trailer)
            except BaseException as exc:
                failure.append(exc)
                raise

        try:
            self.aggregator.ForwardUpdate(
                requests(), metadata=call_metadata(self.token), timeout=3600
            )
        except grpc.RpcError as exc:
            if failure and isinstance(failure[0], (WireError, StateError)):
                raise failure[0] from None
            if failure and isinstance(failure[0], grpc.RpcError):
                raise failure[0] from None  # the participant's own stream broke
            raise _Relayed(exc) from None

    def _pretrain_delta(self, header: Any, messages: Iterator[Any]) -> pb.SubmitUpdateResponse:
        self.state.check_pretrain_task(header.sender)
        got = read_all(messages, lambda h: self._reader_for(h, keep=True))
        assert got.reader is not None and got.reader.flat is not None
        self.metrics.rpc.received_bytes.inc(got.reader.received)
        self.state.accept_pretrain_delta(header.sender, got.reader.flat)
        return pb.SubmitUpdateResponse(accepted=True, round=-1)

    @rpc("Clusterer.ReportEvaluation")
    def ReportEvaluation(
        self, request: pb.ReportEvaluationRequest, context: grpc.ServicerContext
    ) -> pb.ReportEvaluationResponse:
        check_id(request.participant_id, "participant_id")
        act_as(request.participant_id)
        check_id(request.evaluation_id, "evaluation_id")
        if not (0.0 <= request.accuracy <= 1.0):
            raise invalid(f"accuracy {request.accuracy} is outside [0, 1]")
        if not math.isfinite(request.loss) or request.loss < 0:
            raise invalid(f"loss {request.loss} must be finite and non-negative")
        if not 0 < request.num_examples <= MAX_SAMPLES:
            raise invalid(f"num_examples must be in [1, {MAX_SAMPLES}]")
        result = Evaluation(request.accuracy, request.loss, request.num_examples)
        self.state.record_evaluation(
            request.participant_id, request.evaluation_id, request.model_version, result
        )
        return pb.ReportEvaluationResponse(accepted=True)

    @rpc("Clusterer.DownloadModel")
    def DownloadModel(
        self, request: pb.DownloadModelRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.DownloadModelResponse]:
        cached = self.models.get(request.model_version)
        if cached is None:
            raise NotFoundError(f"model version {request.model_version} is not available")
        header, chunks, sha = cached
        self.metrics.rpc.sent_bytes.inc(header.total_bytes)
        messages = encoded_stream(pb.DownloadModelResponse, header, chunks, sha)
        yield from self.watch.watch(messages, context, "DownloadModel")  # a receiver that stalls

    @rpc("Clusterer.GetStatus")
    def GetStatus(
        self, request: pb.GetStatusRequest, context: grpc.ServicerContext
    ) -> pb.GetStatusResponse:
        members = page(request.members_offset, request.members_limit, 100, MAX_PAGE)
        rounds = page(request.history_offset, request.history_limit, MAX_PAGE, MAX_PAGE)
        v = self.state.view(members, rounds)
        return pb.GetStatusResponse(
            phase=v.phase,
            round=v.round,
            rounds=self.config.federation.rounds,
            participants=v.members_total,
            members_total=v.members_total,
            history_total=v.history_total,
            model_version=v.model_version,
            history=[
                pb.RoundSummary(**{k: x for k, x in h.items() if k in ROUND_FIELDS})
                for h in v.history
            ],
            clusters=[
                pb.ParticipantCluster(participant_id=p, cluster=c, group=g)
                for p, c, g in v.clusters
            ],
            purity=-1.0 if v.purity is None else v.purity,
            done=v.phase == "done",
            strategy=self.config.federation.strategy,
            error=v.error,
        )


ROUND_FIELDS = set(pb.RoundSummary.DESCRIPTOR.fields_by_name)
MAX_PAGE = 1000  # members or rounds in one GetStatus answer
MAX_GROUPS = 1 << 16
BUSY_POLL_S = 2.0  # when every poll slot is taken, ask again after about this long


def page(offset: int, limit: int, default: int, most: int) -> slice:
    """The slice a (offset, limit) request asks for; limits outside [0, most] are refused."""
    if offset < 0 or limit < 0:
        raise invalid("offsets and limits must not be negative")
    if limit > most:
        raise invalid(f"at most {most} entries per page, asked for {limit}")
    return slice(offset, offset + (limit or default))


class _Relayed(Exception):
    """An aggregator status passed back to the participant unchanged."""

    def __init__(self, exc: grpc.RpcError) -> None:
        super().__init__(exc.details())
        self.code = exc.code()
        self.details = exc.details() or "aggregator error"


@dataclass
class ClustererService:
    """A built clusterer: server (not started), port, servicer, coordinator, health."""

    server: grpc.Server
    port: int
    servicer: ClustererServicer
    coordinator: Coordinator
    health: HealthServicer
    aggregator_channel: grpc.Channel
    registry: CollectorRegistry
    metrics_port: int | None = None
    health_server: grpc.Server | None = None
    health_port: int | None = None
    tls_port: int | None = None

    def on_stop(self) -> None:
        """Stop the round protocol and the health port (SIGTERM)."""
        self.coordinator.shutdown()
        if self.health_server is not None:
            self.health_server.stop(0)

    def start(self) -> None:
        """Start serving gRPC and /metrics, then the round protocol."""
        self.server.start()
        if self.health_server is not None:
            self.health_server.start()
        self.metrics_port = serve_metrics(
            self.registry,
            self.servicer.config.service.metrics_host,
            self.servicer.config.service.metrics_port,
        )
        self.coordinator.start()


class _RelayInterceptor(grpc.ServerInterceptor):
    """Turns a relayed aggregator status into the same status for the caller."""

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or not handler.request_streaming or handler.response_streaming:
            return handler
        inner = handler.stream_unary

        def relay(request_iterator: Any, context: grpc.ServicerContext) -> Any:
            try:
                return inner(request_iterator, context)
            except _Relayed as exc:
                context.abort(exc.code, exc.details)

        return grpc.stream_unary_rpc_method_handler(
            relay, handler.request_deserializer, handler.response_serializer
        )


def policy(max_workers: int) -> Policy:
    """Participants call the participant RPCs (as themselves: the servicer checks ids);
    status is for operators. Per identity: one poll and one upload at a time (plus one
    being torn down). Long polls take at most half the threads (past that they answer at
    once), uploads and downloads an eighth each, reflection and health watches a few: a
    quarter is always free for joins, evaluations, status and health checks."""
    part = frozenset({"participant"})
    return Policy(
        roles={
            "Join": part,
            "GetTask": part,
            "SubmitUpdate": part,
            "ReportEvaluation": part,
            "DownloadModel": part,
            "GetStatus": frozenset({"operator"}),
        },
        per_identity={"GetTask": 2, "SubmitUpdate": 2, "DownloadModel": 2},
        default_per_identity=4,
        total={
            "SubmitUpdate": max(1, max_workers // 8),
            "DownloadModel": max(1, max_workers // 8),
        },
    )


def build_service(config: ClustererConfig) -> ClustererService:
    """Build the clusterer server, its coordinator and the channel to the aggregator."""
    tokens = config.clustering.participant_tokens
    authenticator, tls = credentials(
        config.transport, "clusterer", TokenTable.load(tokens) if tokens else None
    )
    models = ModelCache()
    registry = CollectorRegistry()
    metrics = ClustererMetrics(registry)
    state = ClustererState(
        get_strategy(config.federation.strategy),
        config.federation.seed,
        config.clustering.max_participants,
        on_phase=metrics.phase.state,
    )
    quiet_refused_streams()  # a refused upload is one log line, not gRPC's traceback

    def connect(client: TlsFiles | None) -> tuple[grpc.Channel, agg_grpc.AggregatorStub]:
        ch = channel(config.clustering.aggregator, client=client)
        return ch, agg_grpc.AggregatorStub(instrument_channel(ch, metrics.rpc))

    if tls is None:
        agg_channel, aggregator = connect(None)
    else:  # the client certificate follows renewals, like the server's
        renewing = Renewing(tls, connect)
        agg_channel, aggregator = renewing.channel, cast(agg_grpc.AggregatorStub, renewing)
    # The token file was read once, by credentials(); the same token goes to the aggregator.
    parts = (config, state, aggregator, models, metrics, authenticator.shared_token)
    coordinator = Coordinator(*parts)
    servicer = ClustererServicer(*parts)
    interceptors = [ServerMetricsInterceptor(metrics.rpc), _RelayInterceptor()]
    svc = config.service
    server = new_server(svc.max_workers, authenticator, policy(svc.max_workers), interceptors)
    pb_grpc.add_ClustererServicer_to_server(servicer, server)
    health = add_health_and_reflection(server, [SERVICE])
    port = bind_service(server, svc.host, svc.port, tls, authenticator)
    tls_port = None
    c = config.clustering
    if c.tls_port is not None and c.tls_cert and c.tls_key:
        tls_port = bind_tls(server, svc.host, c.tls_port, c.tls_cert, c.tls_key)
    health_server, health_port = serve_health(health, svc.host, svc.health_port)
    return ClustererService(
        server,
        port,
        servicer,
        coordinator,
        health,
        agg_channel,
        registry,
        tls_port=tls_port,
        health_server=health_server,
        health_port=health_port,
    )


def create_server(config: ClustererConfig) -> tuple[grpc.Server, int]:
    """Build (not start) the clusterer server; returns it and its bound port."""
    service = build_service(config)
    return service.server, service.port
