"""The clusterer's gRPC service: membership, long-polled tasks, uploads forwarded as streams."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1.health import HealthServicer
from prometheus_client import CollectorRegistry

from services.clusterer.coordinator import ClustererParts, Coordinator, ModelCache
from services.clusterer.metrics import ClustererMetrics
from services.clusterer.settings import ClustererConfig
from services.clusterer.state import ClustererState, Evaluation
from services.common.errors import NotFoundError, StateError
from services.common.grpc_client import call_metadata, channel, quiet_refused_streams
from services.common.grpc_server import add_health_and_reflection, bind, bind_tls, new_server, rpc
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
    check_header_spec,
    check_update_header,
    invalid,
    spec_from_pb,
)

logger = logging.getLogger(__name__)

SERVICE = "flclustering.v1.Clusterer"


class ClustererServicer(pb_grpc.ClustererServicer, ClustererParts):
    """Unpack, call the state's rules, pack: the coordinator thread runs the rounds."""

    def __init__(self, *parts: Any) -> None:  # ClustererParts' arguments
        ClustererParts.__init__(self, *parts)
        t = self.config.training
        self.training = pb.TrainingSettings(
            epochs=t.local_epochs,
            batch_size=t.batch_size,
            lr=t.lr,
            momentum=t.momentum,
            pre_steps=t.pre_steps,
            adjusted=t.adjusted,
        )

    @rpc("Clusterer.Join")
    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinResponse:
        pid = request.participant_id
        if not pid or len(pid) > MAX_ID_LENGTH or not pid.isprintable():
            raise invalid(f"participant_id must be 1-{MAX_ID_LENGTH} printable characters")
        if not (0 <= request.num_train <= MAX_SAMPLES and 0 <= request.num_test <= MAX_SAMPLES):
            raise invalid(f"sample counts must be in [0, {MAX_SAMPLES}]")
        if request.group < -1:
            raise invalid("group must be -1 (unknown) or a group index")
        device = request.device[:MAX_ID_LENGTH]
        if self.state.join(pid, request.num_train, request.num_test, request.group, device):
            logger.info("[Clusterer.Join] %s joined (%s)", pid, device or "?")
        joined = self.state.joined()
        self.metrics.joined.set(joined)
        return pb.JoinResponse(participant_id=pid, participants=joined)

    @rpc("Clusterer.GetTask")
    def GetTask(
        self, request: pb.GetTaskRequest, context: grpc.ServicerContext
    ) -> pb.GetTaskResponse:
        cap = self.config.transport.poll_cap_s
        wait = min(max(request.wait_s, 0.0), cap) if math.isfinite(request.wait_s) else 0.0
        task = self.state.next_task(request.participant_id, wait, context.is_active)
        if task is None:
            kind, round_, version = self.state.idle_answer()
            return pb.GetTaskResponse(kind=kind, round=round_, model_version=version)  # type: ignore[arg-type]
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
            reply = self._submit(request_iterator)
        if reply.round >= 0:
            self.metrics.updates_received.inc()
        return reply

    def _submit(
        self, request_iterator: Iterator[pb.SubmitUpdateRequest]
    ) -> pb.SubmitUpdateResponse:
        it = iter(request_iterator)
        first = next(it, None)
        if first is None or first.WhichOneof("part") != "header":
            raise invalid("a weights stream must start with a header")
        h = first.header
        check_update_header(h)
        if h.kind == "pretrain-delta":
            return self._pretrain_delta(h, itertools.chain([first], it))
        if h.kind != "weights":
            raise invalid(f"unknown update kind {h.kind[:32]!r} (weights or pretrain-delta)")
        cluster = self.state.begin_upload(h.sender, h.round, h.model_version)
        accepted = False
        try:
            self._forward(first, it, cluster)
            accepted = True
        finally:
            self.state.finish_upload(h.sender, h.round, accepted)
        return pb.SubmitUpdateResponse(accepted=True, round=h.round)

    def _reader_for(self, header: Any, keep: bool = False) -> StreamReader:
        """Check an upload's header against the model; the reader for its bytes."""
        check_header_spec(spec_from_pb(header.tensors), self.models.spec)
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
        if not (0.0 <= request.accuracy <= 1.0):
            raise invalid(f"accuracy {request.accuracy} is outside [0, 1]")
        if not math.isfinite(request.loss) or request.loss < 0:
            raise invalid(f"loss {request.loss} must be finite and non-negative")
        if request.num_examples <= 0:
            raise invalid("num_examples must be positive")
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
        yield from encoded_stream(pb.DownloadModelResponse, header, chunks, sha)

    @rpc("Clusterer.GetStatus")
    def GetStatus(
        self, request: pb.GetStatusRequest, context: grpc.ServicerContext
    ) -> pb.GetStatusResponse:
        v = self.state.view()
        return pb.GetStatusResponse(
            phase=v.phase,
            round=v.round,
            rounds=self.config.federation.rounds,
            participants=len(v.clusters),
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
    tls_port: int | None = None

    def on_stop(self) -> None:
        """Stop the round protocol (SIGTERM)."""
        self.coordinator.shutdown()

    def start(self) -> None:
        """Start serving gRPC and /metrics, then the round protocol."""
        self.server.start()
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


def build_service(config: ClustererConfig) -> ClustererService:
    """Build the clusterer server, its coordinator and the channel to the aggregator."""
    token = config.transport.token()  # the file is read once
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
    agg_channel = channel(config.clustering.aggregator)
    aggregator = agg_grpc.AggregatorStub(instrument_channel(agg_channel, metrics.rpc))
    parts = (config, state, aggregator, models, metrics, token)
    coordinator = Coordinator(*parts)
    servicer = ClustererServicer(*parts)
    interceptors = [ServerMetricsInterceptor(metrics.rpc), _RelayInterceptor()]
    svc = config.service
    server = new_server(svc.max_workers, token, interceptors)
    pb_grpc.add_ClustererServicer_to_server(servicer, server)
    health = add_health_and_reflection(server, [SERVICE])
    port = bind(server, svc.host, svc.port)
    tls_port = None
    c = config.clustering
    if c.tls_port is not None and c.tls_cert and c.tls_key:
        tls_port = bind_tls(server, svc.host, c.tls_port, c.tls_cert, c.tls_key)
    return ClustererService(
        server, port, servicer, coordinator, health, agg_channel, registry, tls_port=tls_port
    )


def create_server(config: ClustererConfig) -> tuple[grpc.Server, int]:
    """Build (not start) the clusterer server; returns it and its bound port."""
    service = build_service(config)
    return service.server, service.port
