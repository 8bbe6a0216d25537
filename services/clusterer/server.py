"""The clusterer's gRPC service: membership, long-polled tasks, uploads forwarded as streams."""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1.health import HealthServicer
from prometheus_client import CollectorRegistry

from services.clusterer.config import ClustererConfig
from services.clusterer.coordinator import Coordinator, ModelCache
from services.clusterer.state import ClustererState, Evaluation, Member, Task
from services.common.errors import NotFoundError, StateError
from services.common.grpc_util import (
    add_health_and_reflection,
    bind,
    bind_tls,
    call_metadata,
    channel,
    new_server,
    rpc,
)
from services.common.metrics import (
    ClustererMetrics,
    ServerMetricsInterceptor,
    counting_refusals,
    instrument_channel,
    serve_metrics,
)
from services.common.pb.flclustering.v1 import aggregator_pb2 as agg_pb
from services.common.pb.flclustering.v1 import aggregator_pb2_grpc as agg_grpc
from services.common.pb.flclustering.v1 import clusterer_pb2 as pb
from services.common.pb.flclustering.v1 import clusterer_pb2_grpc as pb_grpc
from services.common.streams import Received, encoded_stream, read_all, validated
from services.common.wire import StreamReader, WireError, check_header_spec, invalid, spec_from_pb

logger = logging.getLogger(__name__)

SERVICE = "flclustering.v1.Clusterer"
MAX_ID_LENGTH = 128


class ClustererServicer(pb_grpc.ClustererServicer):
    """Thin handlers over the shared state; the coordinator thread runs the rounds."""

    def __init__(
        self,
        config: ClustererConfig,
        state: ClustererState,
        coordinator: Coordinator,
        aggregator: agg_grpc.AggregatorStub,
        models: ModelCache,
        metrics: ClustererMetrics,
    ) -> None:
        self.metrics = metrics
        self.config = config
        self.state = state
        self.coordinator = coordinator
        self.aggregator = aggregator
        self.models = models
        self.training = pb.TrainingSettings(
            epochs=config.local_epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            momentum=config.momentum,
            pre_steps=config.pre_steps,
            adjusted=config.adjusted,
        )

    def _member(self, participant: str) -> Member:
        """The member (cond held); unknown ids are NOT_FOUND so clients re-join."""
        m = self.state.members.get(participant)
        if m is None:
            raise NotFoundError(f"unknown participant {participant!r}: call Join first")
        m.last_seen = time.monotonic()
        return m

    @rpc("Clusterer.Join")
    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinResponse:
        pid = request.participant_id
        if not pid or len(pid) > MAX_ID_LENGTH or not pid.isprintable():
            raise invalid(f"participant_id must be 1-{MAX_ID_LENGTH} printable characters")
        if request.num_train < 0 or request.num_test < 0:
            raise invalid("sample counts must not be negative")
        with self.state.cond:
            known = self.state.members.get(pid)
            if known is None:
                member = Member(
                    pid,
                    request.num_train,
                    request.num_test,
                    request.group,
                    request.device,
                    time.monotonic(),
                )
                self.state.members[pid] = member
                strategy = self.coordinator.strategy
                if self.state.phase not in ("waiting", "pretraining"):
                    if strategy.clustered:
                        self.state.tasks[pid] = Task(pb.TASK_KIND_PRETRAIN, -1, 0)
                    else:
                        member.cluster = (
                            len(self.state.members) - 1 if strategy.per_participant else 0
                        )
                elif self.state.phase == "pretraining":
                    self.state.tasks[pid] = Task(pb.TASK_KIND_PRETRAIN, -1, 0)
                logger.info("[Clusterer.Join] %s joined (%s)", pid, request.device or "?")
                self.metrics.joined.set(len(self.state.members))
            else:
                known.last_seen = time.monotonic()
            self.state.cond.notify_all()
            return pb.JoinResponse(participant_id=pid, participants=len(self.state.members))

    @rpc("Clusterer.GetTask")
    def GetTask(
        self, request: pb.GetTaskRequest, context: grpc.ServicerContext
    ) -> pb.GetTaskResponse:
        wait = min(max(request.wait_s, 0.0), self.config.poll_cap_s)
        pid = request.participant_id
        with self.state.cond:
            self._member(pid)
            deadline = time.monotonic() + wait
            while pid not in self.state.tasks and context.is_active():
                left = deadline - time.monotonic()
                if left <= 0 or self.state.phase in ("done", "failed"):
                    break
                self.state.cond.wait(left)
            self.state.touch(pid)
            task = self.state.tasks.get(pid)
            if task is not None:
                training = pb.TrainingSettings()
                training.CopyFrom(self.training)
                training.lr = self.config.lr_at(max(task.round, 0))
                return task.to_pb(training)
            kind = (
                pb.TASK_KIND_DONE if self.state.phase in ("done", "failed") else pb.TASK_KIND_WAIT
            )
            return pb.GetTaskResponse(
                kind=kind, round=self.state.round, model_version=self.state.model_version
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
        if h.kind == "pretrain-delta":
            return self._pretrain_delta(h, itertools.chain([first], it))
        if h.kind != "weights":
            raise invalid(f"unknown update kind {h.kind!r} (weights or pretrain-delta)")
        pid = h.sender
        with self.state.cond:
            self._member(pid)
            r = self.state.collecting_round
            if pid in self.state.received or pid in self.state.in_flight:
                raise StateError(
                    f"duplicate submission: {pid} already sent its update for round {h.round}"
                )
            if r is None or h.round != r:
                open_ = "no round is open" if r is None else f"the open round is {r}"
                raise StateError(f"round {h.round} does not take updates now ({open_})")
            if pid not in self.state.selected:
                raise StateError(f"{pid} was not selected in round {r}")
            if h.model_version != self.state.model_version:
                raise StateError(
                    f"trained from model version {h.model_version}, "
                    f"round {r} uses {self.state.model_version}"
                )
            if h.num_samples < 0:
                raise invalid("num_samples must not be negative")
            cluster = self.state.selected[pid]
            self.state.in_flight.add(pid)
        try:
            self._forward(first, it, cluster)
        finally:
            with self.state.cond:
                self.state.in_flight.discard(pid)
        with self.state.cond:
            self.state.received.add(pid)
            task = self.state.tasks.get(pid)
            if task is not None and task.kind == pb.TASK_KIND_TRAIN:
                del self.state.tasks[pid]
            self.state.cond.notify_all()
        return pb.SubmitUpdateResponse(accepted=True, round=h.round)

    def _reader_for(self, header: Any, keep: bool = False) -> StreamReader:
        """Check an upload's header against the model; the reader for its bytes."""
        check_header_spec(spec_from_pb(header.tensors), self.models.spec)
        return StreamReader(self.models.spec, keep=keep, max_bytes=self.config.max_update_bytes)

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
                requests(), metadata=call_metadata(self.config.auth_token), timeout=3600
            )
        except grpc.RpcError as exc:
            if failure and isinstance(failure[0], (WireError, StateError)):
                raise failure[0] from None
            if failure and isinstance(failure[0], grpc.RpcError):
                raise failure[0] from None  # the participant's own stream broke
            raise _Relayed(exc) from None

    def _pretrain_delta(self, header: Any, messages: Iterator[Any]) -> pb.SubmitUpdateResponse:
        pid = header.sender
        with self.state.cond:
            self._member(pid)
            task = self.state.tasks.get(pid)
            if task is None or task.kind != pb.TASK_KIND_PRETRAIN:
                raise StateError(f"{pid} has no pre-training task")

        got = read_all(messages, lambda h: self._reader_for(h, keep=True))
        assert got.reader is not None and got.reader.flat is not None
        self.metrics.rpc.received_bytes.inc(got.reader.received)
        with self.state.cond:
            task = self.state.tasks.get(pid)
            if task is None or task.kind != pb.TASK_KIND_PRETRAIN:
                raise StateError(f"{pid}'s pre-training task was withdrawn (too late)")
            self.coordinator.accept_pretrain_delta(pid, got.reader.flat)
            del self.state.tasks[pid]
            self.state.cond.notify_all()
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
        pid = request.participant_id
        with self.state.cond:
            self._member(pid)
            task = self.state.tasks.get(pid)
            tag = request.evaluation_id
            if task is None or task.kind != pb.TASK_KIND_EVALUATE or task.evaluation_id != tag:
                raise StateError(f"{pid} has no open evaluation {tag!r}")
            if request.model_version != task.model_version:
                raise StateError(
                    f"evaluated version {request.model_version}, "
                    f"the task asked for {task.model_version}"
                )
            results = self.state.evaluations.get(tag)
            if results is not None:
                results[pid] = Evaluation(request.accuracy, request.loss, request.num_examples)
            del self.state.tasks[pid]
            self.state.cond.notify_all()
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
        with self.state.cond:
            s = self.state
            history = [
                pb.RoundSummary(**{k: v for k, v in h.items() if k in ROUND_FIELDS})
                for h in s.history
            ]
            return pb.GetStatusResponse(
                phase=s.phase,
                round=s.round,
                rounds=self.config.rounds,
                participants=len(s.members),
                model_version=s.model_version,
                history=history,
                clusters=[
                    pb.ParticipantCluster(participant_id=p, cluster=m.cluster, group=m.group)
                    for p, m in sorted(s.members.items())
                ],
                purity=-1.0 if s.purity is None else s.purity,
                done=s.phase == "done",
                strategy=self.config.strategy,
                error=s.error,
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

    def start(self) -> None:
        """Start serving gRPC and /metrics, then the round protocol."""
        self.server.start()
        self.metrics_port = serve_metrics(
            self.registry, self.servicer.config.metrics_host, self.servicer.config.metrics_port
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
    state = ClustererState()
    models = ModelCache()
    registry = CollectorRegistry()
    metrics = ClustererMetrics(registry)
    agg_channel = channel(config.aggregator)
    aggregator = agg_grpc.AggregatorStub(instrument_channel(agg_channel, metrics.rpc))
    coordinator = Coordinator(config, state, aggregator, models, metrics)
    servicer = ClustererServicer(config, state, coordinator, aggregator, models, metrics)
    interceptors = [ServerMetricsInterceptor(metrics.rpc), _RelayInterceptor()]
    server = new_server(config.max_workers, config.auth_token, interceptors)
    pb_grpc.add_ClustererServicer_to_server(servicer, server)
    health = add_health_and_reflection(server, [SERVICE])
    port = bind(server, config.host, config.port)
    tls_port = None
    if config.tls_port is not None and config.tls_cert and config.tls_key:
        tls_port = bind_tls(server, config.host, config.tls_port, config.tls_cert, config.tls_key)
    return ClustererService(
        server, port, servicer, coordinator, health, agg_channel, registry, tls_port=tls_port
    )


def create_server(config: ClustererConfig) -> tuple[grpc.Server, int]:
    """Build (not start) the clusterer server; returns it and its bound port."""
    service = build_service(config)
    return service.server, service.port
